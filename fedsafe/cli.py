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
    p.add_argument("--model", default="mlp", help="model family: mlp, cnn, lstm, gru, transformer, autoencoder, gan")
    p.add_argument("--dataset", default="breast-cancer",
                   help="built-in dataset (breast-cancer, digits, digits-seq, digits-anomaly, diabetes, synthetic) "
                        "or a .csv/.npz file with a 'label' column")
    p.add_argument("--model-options", default="", help="the family's options, e.g. 'hidden=128,dropout=0.2'")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (a model option)")
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
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty (a proximal step after each optimizer step)")
    p.add_argument("--augment", action="store_true", help="random one-pixel shifts of each image on the nodes")
    p.add_argument("--early-stopping-patience", type=int, default=0,
                   help="stop after this many rounds without a better validation metric (0: off)")
    p.add_argument("--early-stopping-metric", default="", help="validation metric to watch (default: the task's headline)")
    p.add_argument("--init-checkpoint", default="", help="initial weights: a .pt state dict or a fedsafe checkpoint.pt")
    p.add_argument("--freeze", default="", help="comma-separated parameter-name prefixes not to train (nor upload)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    _add_ledger(sub)
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
        model_options=_model_options(args), l1=args.l1, augment=args.augment,
        early_stopping_patience=args.early_stopping_patience, early_stopping_metric=args.early_stopping_metric,
        init_checkpoint=args.init_checkpoint, freeze=args.freeze,
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


def _model_options(args: argparse.Namespace) -> str:
    """--model-options, with --dropout added (or overriding a dropout given there)."""
    if args.dropout is None:
        return args.model_options
    kept = [item for item in args.model_options.split(",") if item.strip() and item.split("=")[0].strip() != "dropout"]
    return ",".join([*kept, f"dropout={args.dropout:g}"])


def _ledger(args: argparse.Namespace) -> int:
    from simulations.report import print_ledgers

    print_ledgers(args.state_dir, args.delta)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from client.data import DataError
    from client.ledger import LedgerError
    from client.policy import PolicyError
    from server.checkpoint import CheckpointError
    from server.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
        handler = {"simulate": _simulate, "ledger": _ledger}[args.command]
        return handler(args)
    except (CliError, ConfigError, DataError, PolicyError, LedgerError, CheckpointError) as err:
        message = str(err)
        print(message if message.startswith("fedsafe") else f"fedsafe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedsafe: interrupted; results so far are in the results directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
