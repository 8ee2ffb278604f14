"""The `fedsafe` command: parse arguments once into typed configs and hand them to the rooms."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import sys
import time

COMMAND_STARTED = time.perf_counter()  # the summary's wall time counts from here: imports and Ray included
from collections.abc import Iterator, Sequence
from pathlib import Path

from .after import commands as after_training

EXIT_USAGE = 2
EXIT_CONTRADICTION = 3  # fedsafe audit: an empirical lower bound above the reported ε


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not a usage dump
        raise CliError(f"{self.prog}: {message}")


def _add_run_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Arguments shared by `simulate` and `sweep`: a flag per run setting that has one (fedsafe.settings),
    then the simulation's own. A sweep takes comma-separated lists for some."""
    from fedsafe.settings import RUN_SETTINGS

    groups = {"": p}
    for setting in RUN_SETTINGS:
        if setting.flag is None or (sweep and setting.key == "dp"):  # a sweep's non-private baseline: ε = inf
            continue
        if sweep and not setting.in_sweep:  # e.g. resume: each point of a sweep is a run of its own
            continue
        if setting.group not in groups:
            groups[setting.group] = p.add_argument_group(setting.group)
        _add_setting_flag(groups[setting.group], setting, listed=sweep and setting.listable)
        if setting.key == "model-options":
            p.add_argument("--dropout", type=float, default=None, help="dropout rate (a model option)")
    p.add_argument("--nodes", default="5", help="number of virtual nodes" + (LISTED if sweep else ""))
    a = p.add_argument_group("simulated attackers (research and tests only)")
    a.add_argument("--attack", default="none", choices=("none", "scale", "sign-flip"))
    a.add_argument("--attackers", type=int, default=0, help="how many nodes attack")
    a.add_argument("--attack-factor", type=float, default=10.0)
    p.add_argument("--out", default=None, help="results directory (default: results/<model>-<dataset>-<time>)")
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="CPUs per virtual node: Ray runs one actor per this many cores")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per virtual node (fractions share one)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. ray://head:10001 or auto)")
    p.add_argument("--backend", default="auto", choices=("auto", "local", "ray"),
                   help="local: every node in this process; ray: Flower's simulation engine; auto (default): local "
                        "for up to 1000 nodes without --ray-address or --client-gpus, else ray")
    p.add_argument("--local-workers", type=int, default=None, metavar="N",
                   help="backend local: train each round's nodes in N processes forked from this one, one thread "
                        "each (default: one per core; 1: every node in this process)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--cap-basis", default="own-update", choices=("own-update", "aggregate"),
                   help="the virtual nodes' node-config cap-basis: which ε of a distributed-dp run counts against "
                        "their cap (own-update: each node's update alone; aggregate: the SecAgg+ sum)")


LISTED = " (comma-separated list)"


def _add_setting_flag(group, setting, listed: bool) -> None:
    """`--<flag>` for a run setting: its type, default, choices and help (`listed`: a sweep's list)."""
    flag = "--" + (setting.flag or setting.key)
    if setting.type is bool:
        action = "store_false" if setting.default else "store_true"
        group.add_argument(flag, dest=setting.name, action=action, help=setting.help)
    elif listed:
        extra = "; 'inf' for a non-private baseline" if setting.key == "epsilon" else ""
        group.add_argument(flag, dest=setting.name, default=f"{setting.default}", help=setting.help + LISTED + extra)
    else:
        group.add_argument(flag, dest=setting.name, type=setting.type, default=setting.default,
                           choices=setting.choices or None, help=setting.help)


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="run a DP federated simulation of virtual nodes on this machine")
    _add_run_arguments(p)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of simulations; write a privacy-utility table and plot")
    _add_run_arguments(p, sweep=True)


def _add_partitions(sub) -> None:
    p = sub.add_parser("partitions", help="show how a dataset would be split over simulated nodes")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--partitioner", default="iid")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--classes-per-node", type=int, default=2)
    p.add_argument("--partition-by", default="")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="results/partitions", help="where partitions.csv and partitions.png go")


def _add_ledger(sub) -> None:
    p = sub.add_parser("ledger", help="show what a node's privacy ledgers say it has spent; verify them; forget one")
    p.add_argument("action", nargs="?", choices=("show", "verify", "forget"), default="show",
                   help="show (default): the table, and any problem; verify: check every ledger and the node "
                        "identity file, one line per problem, exit 1 on any; forget: knowingly restart a lost "
                        "ledger's budget at zero (recorded in the identity file)")
    p.add_argument("--state-dir", default="~/.fedsafe/ledgers")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--data-key", default=None, help="forget: the data key the node's refusal names")


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
    p.add_argument("--data-path", required=True, help="this node's data: .npz (x, y), .csv/.parquet with a 'label' "
                   "column, a saved Hugging Face dataset, or a folder of images with one sub-folder per class")
    p.add_argument("--state-dir", default="~/.fedsafe/ledgers", help="where the privacy ledgers live")
    p.add_argument("--max-epsilon", type=float, required=True, help="lifetime ε cap on this data, over all runs")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-noise-multiplier", type=float, default=None,
                   help="refuse a run whose noise multiplier σ is above this: its update would be noise (default 20)")
    p.add_argument("--cap-basis", default=None, choices=("own-update", "aggregate"),
                   help="distributed-dp runs: which ε counts against --max-epsilon: own-update (this node's update "
                        "alone, the default) or aggregate (trusting SecAgg+ and its threshold of honest survivors)")
    p.add_argument("--allow-models", default=None, metavar="REFS",
                   help="user model and task code a run may make this node import: comma list of "
                        "package.module:function or package names, installed here (node-config allow-models)")
    p.add_argument("--dataset-id", default=None,
                   help="name the ledger keys on (default: the digest of the data file's records, so a moved or "
                        "copied file keeps its ledger); e.g. for data that grows, whose records change")
    p.add_argument("--port", type=int, default=9094,
                   help="local Runtime API port; every node on one machine needs its own")
    p.add_argument("--max-retries", type=int, default=None, help="give up after this many reconnection attempts")
    p.add_argument("--max-wait-time", type=float, default=None, help="give up reconnecting after this many seconds")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds between asking the SuperLink for work while idle (Flower's own: 3; a shorter "
                        "wait makes rounds faster and costs one small authenticated request per interval)")
    p.add_argument("--cold-start", action="store_true",
                   help="start every ClientApp as a fresh process (Flower's default) instead of forking it from a "
                        "process that has imported PyTorch and Opacus once (slower: seconds per round)")
    p.add_argument("--allow-app", action="append", default=[], metavar="SHA256",
                   help="an app package this node may run: the SHA-256 `fedsafe app-hash` prints for the "
                        "coordinator's app (repeatable). Runs of any other app are refused before any of its "
                        "code is installed")
    p.add_argument("--allow-any-app", action="store_true",
                   help="run whatever app the coordinator ships (its code then decides whether DP and the "
                        "ledger are used): a test network only")
    p.add_argument("--insecure", action="store_true", help="no TLS: a trusted test network only")
    # Test and simulation only; hidden from --help, documented in docs/deployment.md.
    p.add_argument("--test-seed-noise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--test-poison", default=None, help=argparse.SUPPRESS)


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="simulation only: hyperparameter search whose privacy cost is charged to the "
                                    "nodes' ledgers (or tune on public proxy data, then train once)")
    _add_run_arguments(p)
    g = p.add_argument_group("tuning (simulations/tune.py)")
    g.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                   help="a run setting and the values to try (repeatable; trials are the product)")
    g.add_argument("--proxy-dataset", default=None,
                   help="tune on this public dataset (built-in name or file shaped like the private data), "
                        "charging nothing to the private ledgers; then train once on --dataset with the best")
    g.add_argument("--search-epsilon", type=float, default=None,
                   help="the nodes' lifetime cap for the whole search (default: the sum of the trials' ε)")


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="simulation only: an empirical lower bound on ε from one run with canaries")
    _add_run_arguments(p)
    g = p.add_argument_group("privacy audit (Steinke, Nasr, Jagielski 2023: one training run)")
    g.add_argument("--canaries", type=int, default=1000, help="m: gradient canaries for the white-box audit")
    g.add_argument("--record-canaries", type=int, default=200, help="record canaries for the black-box audit")
    g.add_argument("--guess-fraction", type=float, default=0.05,
                   help="k = this fraction of the canaries: guesses on each side (most and least confident)")


def _add_app_hash(sub) -> None:
    p = sub.add_parser("app-hash", help="print the SHA-256 of the app package `flwr run DIR` ships "
                                        "(what nodes pin with `fedsafe node --allow-app`)")
    p.add_argument("project", nargs="?", default=".", help="the Flower app's directory (default: .)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    _add_sweep(sub)
    _add_audit(sub)
    _add_tune(sub)
    _add_partitions(sub)
    _add_ledger(sub)
    _add_credentials(sub)
    _add_superlink(sub)
    _add_node(sub)
    _add_app_hash(sub)
    after_training.add_parsers(sub)  # export, predict, card, explain, compress (fedsafe.after)
    return parser


def _number(text: str, kind, name: str):
    try:
        return kind(text)
    except ValueError:
        raise CliError(f"fedsafe: argument --{name}: invalid {kind.__name__} value: {text!r}") from None


def _run_config(args: argparse.Namespace, listed: bool = False, **overrides):
    """The RunConfig of the run settings' flags and `overrides` (`listed`: a sweep, whose listed settings
    the grid sets point by point)."""
    from fedsafe.server.config import RunConfig
    from fedsafe.settings import RUN_SETTINGS

    values = {s.name: getattr(args, s.name) for s in RUN_SETTINGS
              if hasattr(args, s.name) and not (listed and s.listable)}
    values["model_options"] = _model_options(args)
    return RunConfig(**{**values, **overrides})


def _simulation_options(args: argparse.Namespace, nodes: int):
    from fedsafe.simulations.run import SimulationOptions

    return SimulationOptions(num_nodes=nodes, client_cpus=args.client_cpus, client_gpus=args.client_gpus,
                             ray_address=args.ray_address, verbose=args.verbose, attack=args.attack,
                             attackers=args.attackers, attack_factor=args.attack_factor, backend=args.backend,
                             cap_basis=args.cap_basis, local_workers=args.local_workers)


def _backend(args: argparse.Namespace, nodes: int):
    """The engine for `nodes` virtual nodes (simulations/backend.py), decided before Ray would start."""
    from fedsafe.simulations.backend import BackendError, choose_backend

    try:
        return choose_backend(args.backend, nodes, args.ray_address, args.client_gpus, args.local_workers)
    except BackendError as err:
        raise CliError(f"fedsafe: {err}") from None


def _default_out(args: argparse.Namespace, kind: str) -> str:
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = args.model.replace(",", "+").replace(":", ".")  # a factory package.module:function
    return args.out or f"results/{kind}{model}-{Path(args.dataset).stem}-{stamp}"


def _simulate(args: argparse.Namespace) -> int:
    from fedsafe.simulations.engine import start_local_ray

    from fedsafe.server.run_dir import reused_out_dir

    nodes = _number(args.nodes, int, "nodes")
    args.out = _default_out(args, "")
    reused = reused_out_dir(Path(args.out), args.resume, f"--out {args.out} --resume")
    if reused:  # before Ray starts: refusing costs nothing
        raise CliError(f"fedsafe simulate: {reused}")
    backend = _backend(args, nodes)
    print(backend.line(), flush=True)
    # Ray boots (about 4 s) while this process imports PyTorch and Flower and checks the run.
    local_ray = start_local_ray(args.ray_address, args.verbose) if backend.name == "ray" else None
    try:
        with _start_up_imports(*SIMULATION_IMPORTS):
            from fedsafe.simulations.report import print_summary
            from fedsafe.simulations.run import simulate, validate_against_data

        cfg = _run_config(args, out_dir=args.out)
        options = _simulation_options(args, nodes)
        if local_ray is not None:  # checked while Ray boots; in process, simulate() checks it (once)
            validate_against_data(cfg, options)
    except BaseException:
        if local_ray is not None:
            local_ray.release()
        raise
    print(f"fedsafe: {nodes} nodes × {cfg.num_rounds} rounds, {args.model} on {args.dataset}, "
          + (f"DP-SGD ε≤{cfg.epsilon:g} δ={cfg.delta:g}" if cfg.dp else "no DP")
          + f", {args.strategy}" + (" over SecAgg+" if args.secagg else "")
          + (f", client-level DP ({args.client_dp})" if args.client_dp != "off" else "")
          + (f"; {args.attackers} simulated attacker(s): {args.attack}" if args.attackers else ""), flush=True)
    outcome = simulate(cfg, options, local_ray=local_ray)
    print_summary(outcome, cfg, COMMAND_STARTED, options.backend_choice().name)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    with _start_up_imports(*SIMULATION_IMPORTS):
        from fedsafe.simulations.sweep import RAN, SweepGrid, parse_list, run_sweep

    grid = SweepGrid(
        epsilons=parse_list(args.epsilon, float, "epsilon"),
        strategies=parse_list(args.strategy, str, "strategy"),
        models=parse_list(args.model, str, "model"),
        alphas=parse_list(args.alpha, float, "alpha"),
        nodes=parse_list(args.nodes, int, "nodes"),
    )
    for nodes in grid.nodes:
        print(_backend(args, nodes).line().replace("fedsafe:", f"fedsafe sweep, {nodes} nodes:", 1), flush=True)
    out = Path(_default_out(args, "sweep-"))
    base = _run_config(args, listed=True, model=grid.models[0], strategy=grid.strategies[0], out_dir=str(out))
    rows = run_sweep(base, grid, _simulation_options(args, grid.nodes[0]), out)
    ran = sum(row["status"] == RAN for row in rows)
    print(f"{ran} of {len(rows)} settings ran" + (f" ({len(rows) - ran} could not: see the status column)"
                                                  if ran < len(rows) else "")
          + f"; table: {out}/privacy_utility.csv, plot: {out}/privacy_utility.png")
    print("note: every setting ran on fresh ledgers, so each row's ε is that run's alone; the search itself was "
          "not charged (choosing the best row costs the composition of all of them: `fedsafe tune` charges it)")
    return 0 if ran else 1


def _tune(args: argparse.Namespace) -> int:
    from fedsafe.simulations.tune import TuneGrid, summary_lines, tune

    grid = TuneGrid.parse(args.tune)
    out = Path(_default_out(args, "tune-"))
    base = _run_config(args, out_dir=str(out))
    report = tune(base, grid, _simulation_options(args, _number(args.nodes, int, "nodes")), out,
                  proxy=args.proxy_dataset, search_epsilon=args.search_epsilon)
    for line in summary_lines(report):
        print(line)
    print(f"report: {out}/tune.json")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedsafe.simulations.audit import AuditError, AuditOptions, PrivacyContradiction, audit

    if args.attackers or args.ray_address or args.client_gpus or args.backend == "ray":
        raise CliError("fedsafe audit: runs in this process on this machine, with honest nodes: "
                       "--attackers, --ray-address, --client-gpus and --backend ray do not apply")
    cfg = _run_config(args, out_dir=_default_out(args, "audit-"))
    options = AuditOptions(num_nodes=_number(args.nodes, int, "nodes"), canaries=args.canaries,
                           record_canaries=args.record_canaries, guess_fraction=args.guess_fraction,
                           verbose=args.verbose)
    print(f"fedsafe audit (simulation only): {options.num_nodes} nodes × {cfg.num_rounds} rounds, {args.model} on "
          f"{args.dataset}, " + (f"DP-SGD ε≤{cfg.epsilon:g} δ={cfg.delta:g}" if cfg.dp else "no DP")
          + f"; node 0 trains with {options.canaries} gradient and {options.record_canaries} record canaries",
          flush=True)
    try:
        report = audit(cfg, options)
    except PrivacyContradiction as err:
        print("\n".join(err.report.lines()))
        print(f"fedsafe audit: {err}", file=sys.stderr, flush=True)
        return EXIT_CONTRADICTION
    except AuditError as err:
        print(f"fedsafe audit: error: {err}", file=sys.stderr, flush=True)
        return 1
    print("\n".join(report.lines()))
    return 0


def _partitions(args: argparse.Namespace) -> int:
    from fedsafe.client.data import PartitionScheme, load_dataset
    from fedsafe.simulations.partition_report import histogram_columns, print_partition_table, write_partition_report

    scheme = PartitionScheme(kind=args.partitioner, num_partitions=args.nodes, alpha=args.alpha,
                             classes_per_node=args.classes_per_node, partition_by=args.partition_by or None,
                             seed=args.seed)
    data = load_dataset(args.dataset, scheme.partition_by).train
    counts = write_partition_report(data, scheme, Path(args.out))
    print_partition_table(counts, histogram_columns(data))
    print(f"written: {args.out}/partitions.csv, {args.out}/partitions.png")
    return 0


def _model_options(args: argparse.Namespace) -> str:
    """--model-options, with --dropout added (or overriding a dropout given there)."""
    if args.dropout is None:
        return args.model_options
    kept = [item for item in args.model_options.split(",") if item.strip() and item.split("=")[0].strip() != "dropout"]
    return ",".join([*kept, f"dropout={args.dropout:g}"])


def _ledger(args: argparse.Namespace) -> int:
    from fedsafe.client.ledger import audit_state_dir, forget
    from fedsafe.simulations.report import print_ledgers

    directory = Path(args.state_dir).expanduser()
    if args.action == "forget":
        if not args.data_key:
            raise CliError("fedsafe ledger forget: --data-key is required (the key the node's refusal names)")
        import getpass
        import socket

        recorded = forget(directory, args.data_key, by=f"{getpass.getuser()}@{socket.gethostname()}")
        print(f"fedsafe: WARNING: data {args.data_key!r} now starts a new privacy budget at zero; its past spend is "
              f"no longer enforced. Recorded in {recorded}", file=sys.stderr)
        return 0
    if not 0 < args.delta < 1:
        raise CliError(f"fedsafe ledger: --delta must be in (0, 1); got {args.delta:g}")
    if not directory.is_dir():
        raise CliError(f"fedsafe ledger: no state directory {directory}")
    audit = audit_state_dir(directory)
    if args.action == "show":
        print_ledgers(audit.ledgers, directory, args.delta)
    for problem in audit.problems:
        print(f"fedsafe: ledger problem: {problem}", file=sys.stderr)
    if args.action == "verify" and not audit.problems:
        print(f"fedsafe: {len(audit.ledgers)} privacy ledger(s) in {directory} verified: hash chains, entries, "
              "accountants and the node identity file agree")
    return 1 if audit.problems else 0


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
    env = flower_environment(flwr_home=opts.database.parent / "flwr")
    print(f"fedsafe: {' '.join(command)} (apps unpacked under FLWR_HOME={env['FLWR_HOME']})", file=sys.stderr,
          flush=True)
    if args.cold_start:
        os.execve(command[0], command, env)  # the SuperLink takes over this process
    return supervise(command, env, warm_program="flwr-serverapp")


def _check_node_device(device: str) -> None:
    """--device names a device this machine lacks: refused at start, not by every round."""
    from fedsafe.client.training import resolve_device

    from .deploy import DeployError

    try:
        resolve_device(device)
    except ValueError as err:
        raise DeployError(f"--device: {err}") from None


def _node(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy import ADMISSION_PATIENCE_S, INSECURE_WARNING, NodeOptions, check_node_data_and_ledger
    from .deploy import flower_environment, node_command, supervise

    opts = NodeOptions(
        superlink=args.superlink, root_cert=Path(args.root_cert) if args.root_cert else None,
        key=Path(args.key).expanduser() if args.key else None, data_path=Path(args.data_path).expanduser(),
        state_dir=Path(args.state_dir).expanduser(), max_epsilon=args.max_epsilon, delta=args.delta,
        device=args.device, max_noise_multiplier=args.max_noise_multiplier, cap_basis=args.cap_basis, port=args.port,
        dataset_id=args.dataset_id, insecure=args.insecure,
        max_retries=args.max_retries, max_wait_time=args.max_wait_time, poll_interval=args.poll_interval,
        seed_noise=args.test_seed_noise, debug_poison=args.test_poison,
        allowed_apps=tuple(args.allow_app), allow_any_app=args.allow_any_app, allow_models=args.allow_models,
    )
    command = node_command(opts)
    _check_node_device(opts.device)
    summary = check_node_data_and_ledger(opts)
    if args.insecure:
        print(INSECURE_WARNING.format(what=""), file=sys.stderr, flush=True)
    if opts.allow_any_app:
        print("fedsafe node: WARNING: --allow-any-app: this node runs whatever app the coordinator ships; "
              "its privacy limits hold only if that app's code enforces them", file=sys.stderr, flush=True)
    else:
        print(f"fedsafe node: runs only the app package(s) sha256 {', '.join(opts.allowed_apps)}",
              file=sys.stderr, flush=True)
    if opts.seed_noise or opts.debug_poison:
        print("fedsafe node: WARNING: TEST-ONLY options are on (seeded, predictable DP noise and/or deliberately "
              "poisoned updates); never use them on real data", file=sys.stderr, flush=True)
    print(f"fedsafe node: {summary}", file=sys.stderr, flush=True)
    env = flower_environment(flwr_home=opts.state_dir / "flwr")
    print(f"fedsafe node: {' '.join(command)} (apps unpacked under FLWR_HOME={env['FLWR_HOME']})",
          file=sys.stderr, flush=True)
    # Without --max-retries/--max-wait-time a node waits out the previous session of a crashed run of itself.
    if opts.max_retries is not None or opts.max_wait_time is not None:
        patience = min(ADMISSION_PATIENCE_S, opts.max_wait_time or 0.0)
    else:
        patience = ADMISSION_PATIENCE_S
    return supervise(command, env, warm_program=None if args.cold_start else "flwr-clientapp",
                     key=opts.key, explain=True, admission_patience=patience)


def _app_hash(args: argparse.Namespace) -> int:
    from .deploy import app_hash

    print(app_hash(Path(args.project)))
    return 0


# What a simulation imports before its first round, wherever in the run it does (scikit-learn: the data and the
# metrics; Opacus: DP-SGD; torch._dynamo: the optimizer's first step): imported at start-up (_start_up_imports).
SIMULATION_IMPORTS = ("fedsafe.client.app", "fedsafe.server.app", "opacus", "sklearn.datasets",
                      "sklearn.model_selection", "sklearn.metrics", "torch._dynamo")

_command_process = False  # main() runs as this process' own command (command()), not as a program's call


@contextlib.contextmanager
def _start_up_imports(*modules: str) -> Iterator[None]:
    """The block's imports, and `modules` (which the command would import later anyway), with the cyclic
    garbage collector paused, and what they made frozen after (gc.freeze). PyTorch, Opacus, SciPy,
    scikit-learn and Flower make ~350,000 objects, none of them garbage, and the collector walked the growing
    heap again and again as they loaded and once more in the rounds (7 full collections, 1.0-1.2 s of CPU in a
    digits simulation of 10 nodes × 5 rounds); frozen, no later collection walks them. Only in the `fedsafe`
    program's own process (command()): a program calling main() (a test) keeps its collector and imports."""
    if not _command_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        for module in modules:
            importlib.import_module(module)
        yield
    finally:
        gc.freeze()
        gc.enable()


def _skip_the_final_collection() -> None:
    """When this process ends, the interpreter's last garbage collections walk every object that PyTorch,
    Opacus, SciPy, scikit-learn and Flower made (~350,000): 1.2-1.6 s of CPU after the command's last line,
    for a process that is ending. Frozen at exit (gc.freeze, registered before the command imports them, so
    run after their own exit handlers), the objects are not walked; modules are still torn down and their
    objects released, and only cycles left unreachable at exit go unfinalized, which Python never promises
    to finalize at exit anyway. Registered once per process, however often main() runs."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def command() -> int:
    """The `fedsafe` program (its console script, `python -m fedsafe`): main() as this process' own command,
    whose start-up may change what only the process' owner should (_start_up_imports)."""
    return main(owns_process=True)


def main(argv: Sequence[str] | None = None, *, owns_process: bool = False) -> int:
    """The `fedsafe` command with `argv` (default: sys.argv[1:])."""
    global _command_process
    _command_process = owns_process
    _skip_the_final_collection()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [after_training.PREDICT]:  # onnxruntime and numpy only: before the imports below pull in torch
        return after_training.run_predict(argv[1:])
    with _start_up_imports():
        from fedsafe.client.data import DataError
        from fedsafe.client.ledger import LedgerError
        from fedsafe.client.policy import PolicyError
        from fedsafe.server.checkpoint import CheckpointError
        from fedsafe.server.config import ConfigError
        from fedsafe.simulations.engine import RayStartError

        from .deploy import DeployError

    if argv and argv[0] in DELEGATED:
        from . import credentials

        return getattr(credentials, DELEGATED[argv[0]])(argv[1:], prog=f"fedsafe {argv[0]}")
    try:
        args = build_parser().parse_args(argv)
        handler = {"simulate": _simulate, "sweep": _sweep, "audit": _audit, "tune": _tune, "partitions": _partitions,
                   "ledger": _ledger, "superlink": _superlink, "node": _node, "app-hash": _app_hash,
                   **after_training.HANDLERS}[args.command]
        return handler(args)
    except (CliError, ConfigError, DataError, PolicyError, LedgerError, CheckpointError, DeployError,
            RayStartError, *after_training.errors()) as err:
        message = str(err)
        print(message if message.startswith("fedsafe") else f"fedsafe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedsafe: interrupted; results so far are in the results directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(command())
