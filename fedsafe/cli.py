"""The `fedsafe` command: parse arguments once into typed configs and hand them to the rooms."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not a usage dump
        raise CliError(f"{self.prog}: {message}")


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="run a DP federated simulation of virtual nodes on this machine")
    p.add_argument("--model", default="mlp", help="model family (mlp, cnn, …)")
    p.add_argument("--dataset", default="breast-cancer",
                   help="built-in dataset (breast-cancer, digits) or a .csv/.npz file with a 'label' column")
    p.add_argument("--nodes", type=int, default=5, help="number of virtual nodes")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds")
    p.add_argument("--epsilon", type=float, default=3.0, help="each node's ε budget for the run")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy (a baseline)")
    p.add_argument("--partitioner", default="iid", help="iid or dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed)")
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="expected Poisson batch size")
    p.add_argument("--optimizer", default="sgd", help="sgd, adam or rmsprop")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C")
    p.add_argument("--accountant", default="rdp", help="rdp or prv")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of nodes sampled per round")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="results directory (default: results/<model>-<dataset>-<time>)")
    p.add_argument("--client-cpus", type=float, default=0.0, help="CPUs per virtual node (0: all cores)")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per virtual node (fractions share one)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def _add_ledger(sub) -> None:
    p = sub.add_parser("ledger", help="show what a node's privacy ledgers say it has spent")
    p.add_argument("--state-dir", default="~/.fedsafe/ledgers")
    p.add_argument("--delta", type=float, default=1e-5)


# `fedsafe certs …` and `fedsafe node-keys …` are fedsafe.credentials' own command lines.
DELEGATED = {"certs": "main_certs", "node-keys": "main_node_keys"}


def _add_credentials(sub) -> None:
    sub.add_parser("certs", add_help=False,
                   help="make a CA and the SuperLink's TLS certificate (`fedsafe certs --help`)")
    sub.add_parser("node-keys", add_help=False,
                   help="make a SuperNode authentication key pair (`fedsafe node-keys --help`)")


def _add_superlink(sub) -> None:
    p = sub.add_parser("superlink", help="run the coordinator's Flower SuperLink with TLS and node authentication")
    p.add_argument("--certs", help="directory with ca.pem, server.pem, server.key (from `fedsafe certs`)")
    p.add_argument("--database", required=True,
                   help="SQLite file for the SuperLink's state (registered nodes, runs); survives restarts")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="the one HTTPS port of the Fleet, Control and Runtime APIs")
    p.add_argument("--log-file", default=None, help="also write the SuperLink's log to this file (rotated)")
    p.add_argument("--cold-start", action="store_true",
                   help="start every ServerApp as a fresh process (Flower's default) instead of forking it from a "
                        "process that has imported PyTorch once")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no node authentication: a trusted test network only")


def _add_node(sub) -> None:
    p = sub.add_parser("node", help="run this site's Flower SuperNode with its privacy policy")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--root-cert", help="the federation's CA certificate (ca.pem) that signed the SuperLink's")
    p.add_argument("--key", help="this node's private key (from `fedsafe node-keys`); its .pub must be registered")
    p.add_argument("--data-path", required=True, help="this node's data: .npz (x, y) or .csv with a 'label' column")
    p.add_argument("--state-dir", default="~/.fedsafe/ledgers", help="where the privacy ledgers live")
    p.add_argument("--max-epsilon", type=float, required=True, help="lifetime ε cap on this data, over all runs")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dataset-id", default=None,
                   help="name the ledger keys on (default: the data file's path); keep it if the file moves")
    p.add_argument("--port", type=int, default=9094,
                   help="local Runtime API port; every node on one machine needs its own")
    p.add_argument("--max-retries", type=int, default=None, help="give up after this many reconnection attempts")
    p.add_argument("--max-wait-time", type=float, default=None, help="give up reconnecting after this many seconds")
    p.add_argument("--cold-start", action="store_true",
                   help="start every ClientApp as a fresh process (Flower's default) instead of forking it from a "
                        "process that has imported PyTorch and Opacus once (slower: seconds per round)")
    p.add_argument("--insecure", action="store_true", help="no TLS: a trusted test network only")
    # Test and simulation only; hidden from --help, documented in docs/deployment.md.
    p.add_argument("--test-seed-noise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--test-poison", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    _add_ledger(sub)
    _add_credentials(sub)
    _add_superlink(sub)
    _add_node(sub)
    return parser


def _simulate(args: argparse.Namespace) -> int:
    import time

    from server.config import RunConfig
    from simulations.report import print_summary
    from simulations.run import SimulationOptions, simulate, validate_against_data

    out = args.out or f"results/{args.model}-{args.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = RunConfig(
        num_rounds=args.rounds, model=args.model, dataset=args.dataset, partitioner=args.partitioner,
        alpha=args.alpha, seed=args.seed, local_epochs=args.local_epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        dp=not args.no_dp, epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
        accountant=args.accountant, fraction_train=args.fraction, out_dir=out,
    )
    options = SimulationOptions(
        num_nodes=args.nodes, client_cpus=args.client_cpus, client_gpus=args.client_gpus,
        ray_address=args.ray_address, verbose=args.verbose,
    )
    validate_against_data(cfg, options)
    started = time.perf_counter()
    print(f"fedsafe: {args.nodes} nodes × {args.rounds} rounds, {args.model} on {args.dataset}, "
          + ("no DP" if args.no_dp else f"DP-SGD ε≤{args.epsilon:g} δ={args.delta:g}"), flush=True)
    outcome = simulate(cfg, options)
    print_summary(outcome, cfg, time.perf_counter() - started)
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from simulations.report import print_ledgers

    print_ledgers(args.state_dir, args.delta)
    return 0


def _superlink(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .deploy import INSECURE_WARNING, SuperLinkOptions, flower_environment, prepare_database, superlink_command
    from .deploy import supervise

    opts = SuperLinkOptions(
        certs=Path(args.certs) if args.certs else None, database=Path(args.database).expanduser(),
        host=args.host, port=args.port, insecure=args.insecure,
        log_file=Path(args.log_file) if args.log_file else None,
    )
    command = superlink_command(opts)
    prepare_database(opts.database)
    if args.insecure:
        print(INSECURE_WARNING.format(what=" and no SuperNode authentication: any process can join as a node"),
              file=sys.stderr, flush=True)
    print("fedsafe: " + " ".join(command), file=sys.stderr, flush=True)
    if args.cold_start:
        os.execve(command[0], command, flower_environment())  # the SuperLink takes over this process
    return supervise(command, flower_environment(), warm_program="flwr-serverapp")


def _node(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy import INSECURE_WARNING, NodeOptions, check_node_data_and_ledger, flower_environment, node_command
    from .deploy import supervise

    opts = NodeOptions(
        superlink=args.superlink, root_cert=Path(args.root_cert) if args.root_cert else None,
        key=Path(args.key).expanduser() if args.key else None, data_path=Path(args.data_path).expanduser(),
        state_dir=Path(args.state_dir).expanduser(), max_epsilon=args.max_epsilon, delta=args.delta,
        device=args.device, port=args.port, dataset_id=args.dataset_id, insecure=args.insecure,
        max_retries=args.max_retries, max_wait_time=args.max_wait_time,
        seed_noise=args.test_seed_noise, debug_poison=args.test_poison,
    )
    command = node_command(opts)
    summary = check_node_data_and_ledger(opts)
    if args.insecure:
        print(INSECURE_WARNING.format(what=""), file=sys.stderr, flush=True)
    if opts.seed_noise or opts.debug_poison:
        print("fedsafe node: WARNING: TEST-ONLY options are on (seeded, predictable DP noise and/or deliberately "
              "poisoned updates); never use them on real data", file=sys.stderr, flush=True)
    print(f"fedsafe node: {summary}", file=sys.stderr, flush=True)
    print("fedsafe node: " + " ".join(command), file=sys.stderr, flush=True)
    return supervise(command, flower_environment(), warm_program=None if args.cold_start else "flwr-clientapp",
                     key=opts.key, explain=True)


def main(argv: Sequence[str] | None = None) -> int:
    from client.data import DataError
    from client.ledger import LedgerError
    from client.policy import PolicyError
    from server.checkpoint import CheckpointError
    from server.config import ConfigError

    from .deploy import DeployError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        from . import credentials

        return getattr(credentials, DELEGATED[argv[0]])(argv[1:], prog=f"fedsafe {argv[0]}")
    try:
        args = build_parser().parse_args(argv)
        handler = {"simulate": _simulate, "ledger": _ledger, "superlink": _superlink, "node": _node}[args.command]
        return handler(args)
    except (CliError, ConfigError, DataError, PolicyError, LedgerError, CheckpointError, DeployError) as err:
        message = str(err)
        print(message if message.startswith("fedsafe") else f"fedsafe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedsafe: interrupted; results so far are in the results directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
