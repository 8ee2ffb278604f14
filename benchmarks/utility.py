"""Utility at strict privacy (issue 12.6): per row, centralised Opacus DP-SGD, fedsafe with local DP at its
default flags, and fedsafe with distributed DP over SecAgg+, on the same 75/25 split, with the ε each spent.

    python benchmarks/utility.py [--rows 0,3] [--distributed-rounds 60] [--distributed-lr 2.0]

Columns:
* centralised: one Opacus DP-SGD model on all training records (fedsafe's own DP-SGD, client/training.py):
  40 epochs, batch 64, SGD lr 0.5, σ calibrated so the whole training spends the row's ε (δ=1e-5); run once
  for rows that differ only in the partitioner (the two digits ε=3 rows).
* local DP: `fedsafe simulate` at its default flags (10 nodes, the row's ε, dataset, model and partitioner;
  rounds, epochs, batch, lr and its schedule as fedsafe picks them: fedsafe/picked_defaults.py), in this
  process (no Ray); ε is the largest any node's ledger reports.
* distributed DP: 10 nodes, `--secagg --distributed-dp --local-steps 1`, SecAgg+ threshold 0.8 (m = 8: each
  node adds σ/√8), node cap-basis aggregate; ε against the aggregate (the row's ε) and, beside it, the
  largest ε of a node's own update alone, both from the nodes' ledgers.
Accuracy is central accuracy on the test split (25%) after the last round. Seeds are fixed (42); the DP
noise of the simulations is seeded (seed-noise, simulations only), the centralised run's too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedsafe.server.config import RunConfig  # noqa: E402

NODES = 10
DELTA = 1e-5
SEED = 42
CENTRAL = dict(epochs=40, batch_size=64, lr=0.5)


@dataclass(frozen=True)
class Row:
    name: str
    dataset: str
    model: str
    epsilon: float
    overrides: dict = field(default_factory=dict)  # partitioner, alpha


ROWS = (
    Row("digits iid ε=3", "digits", "cnn", 3.0),
    Row("digits Dirichlet α=0.5 ε=3", "digits", "cnn", 3.0, {"partitioner": "dirichlet", "alpha": 0.5}),
    Row("digits iid ε=8", "digits", "cnn", 8.0),
    Row("breast-cancer ε=1 (MLP)", "breast-cancer", "mlp", 1.0),
    Row("breast-cancer ε=3 (MLP)", "breast-cancer", "mlp", 3.0),
)


def row_config(row: Row, out: Path, **settings) -> RunConfig:
    return RunConfig(**{"dataset": row.dataset, "model": row.model, "epsilon": row.epsilon, "delta": DELTA,
                        "seed": SEED, "out_dir": str(out), **row.overrides, **settings})


def centralised(row: Row, out: Path) -> tuple[float, float]:
    """(test accuracy, ε spent) of Opacus DP-SGD on all the training records."""
    import torch
    from flwr.app import ArrayRecord

    from fedsafe.client.accounting import calibrate_noise, epsilon
    from fedsafe.client.data import fit_view, load_dataset
    from fedsafe.client.training import TrainSettings, poisson_schedule, train
    from fedsafe.models import DataSpec, build_model, parse_model_options, preferred_grad_sample_mode, task_for
    from fedsafe.server.app import global_model_setup

    cfg = row_config(row, out)
    initial, model_config, evaluator = global_model_setup(cfg)
    spec = DataSpec(input_shape=tuple(model_config["input-shape"]), num_classes=int(model_config["num-classes"]),
                    task=str(model_config["task"]))
    data = fit_view(load_dataset(row.dataset).train, spec.input_shape)
    q, batches = poisson_schedule(len(data), CENTRAL["batch_size"])
    steps = batches * CENTRAL["epochs"]
    sigma = calibrate_noise([], q, steps, row.epsilon, DELTA)
    model = build_model(row.model, spec, parse_model_options(cfg.model_options))
    model.load_state_dict(initial.to_torch_state_dict())
    torch.manual_seed(SEED)
    settings = TrainSettings(local_epochs=CENTRAL["epochs"], batch_size=CENTRAL["batch_size"], lr=CENTRAL["lr"],
                             lr_schedule="constant",
                             noise_multiplier=sigma, grad_sample_mode=preferred_grad_sample_mode(row.model))
    outcome = train(model, task_for(spec.task, spec.num_classes), data, settings, torch.device("cpu"), seed=SEED)
    spent = epsilon(list(outcome.dp_spend), DELTA)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return evaluator(ArrayRecord(state))["accuracy"], spent


def federated(cfg: RunConfig, cap_basis: str = "own-update") -> tuple[float, float, float]:
    """(test accuracy, largest node ε on its cap basis, largest own-update ε) of a simulated federation."""
    from fedsafe.client.accounting import OWN_UPDATE
    from fedsafe.client.ledger import audit_state_dir
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process

    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=NODES, cap_basis=cap_basis), progress=None)
    rounds = [r for r in outcome.history if "aggregated" in r]
    accuracy = (rounds[-1].get("eval") or {}).get("accuracy", float("nan"))
    spent = max(outcome.node_epsilon.values()) if outcome.node_epsilon else float("nan")
    own = [ledger.epsilon(cfg.delta, cfg.accountant, OWN_UPDATE)
           for ledger in audit_state_dir(Path(cfg.out_dir) / "ledgers").ledgers]
    return accuracy, spent, max(own) if own else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))),
                        help="which rows (0-based, comma list)")
    parser.add_argument("--distributed-rounds", type=int, default=60)
    parser.add_argument("--distributed-lr", type=float, default=2.0)
    parser.add_argument("--distributed-batch", type=int, default=32)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    started = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {NODES} nodes, δ={DELTA:g}, "
          f"seed {SEED}; distributed DP: {args.distributed_rounds} rounds of one step, lr {args.distributed_lr:g}, "
          f"batch {args.distributed_batch}, m=8", flush=True)
    header = (f"{'row':<28} | {'centralised (ε)':<16} | {'local DP, defaults (ε)':<23} | "
              f"{'distributed DP (ε aggregate / own update)':<42} | s")
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    central_runs: dict[tuple, tuple[float, float]] = {}  # the partitioner plays no part in the centralised run
    with tempfile.TemporaryDirectory(prefix="fedsafe-utility-") as scratch:
        for index in (int(i) for i in args.rows.split(",")):
            row, t0 = ROWS[index], time.perf_counter()
            out = Path(scratch) / f"row{index}"
            same = (row.dataset, row.model, row.epsilon)
            if same not in central_runs:
                central_runs[same] = centralised(row, out / "central")
            central_acc, central_eps = central_runs[same]
            local = row_config(row, out / "local", num_partitions=NODES)
            local_acc, local_eps, _ = federated(local)
            dist_acc, dist_eps, dist_own = federated(row_config(
                row, out / "distributed", num_partitions=NODES, secagg=True, distributed_dp=True, local_steps=1,
                secagg_threshold=0.8, num_rounds=args.distributed_rounds, lr=args.distributed_lr,
                batch_size=args.distributed_batch), cap_basis="aggregate")
            line = (f"{row.name:<28} | {central_acc:.3f} ({central_eps:.2f}){'':<4} | "
                    f"{local_acc:.3f} ({local_eps:.2f}){'':<11} | "
                    f"{dist_acc:.3f} ({dist_eps:.2f} / {dist_own:.2f}){'':<23} | {time.perf_counter() - t0:.0f}")
            lines.append(line)
            print(line, flush=True)
            print(f"{'':<28}   local DP ran as picked: "
                  + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in local.picked), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    if not all(math.isfinite(x) for x in (central_acc, local_acc, dist_acc)):
        sys.exit(1)


if __name__ == "__main__":
    main()
