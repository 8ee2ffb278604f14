"""Bytes uploaded per round and final accuracy, with and without compress-updates, in one run.

The same federation twice (same seed, same partitions, DP on, seeded noise), through the real ClientApp
of each virtual node and the coordinator's real round loop (fedsafe.simulations.run.simulate_in_process,
no Ray): once as it is, once with compress-updates. Bytes are each round's `upload_bytes` (the replies'
contents as Flower serialises them for transfer: every record and array, framing included, without the
transport's own). Accuracy is the coordinator's held-out accuracy after the last round. Target: at least
4x fewer bytes, accuracy within one point.

    python benchmarks/compress_updates.py [--model cnn] [--dataset digits] [--nodes 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsafe.picked_defaults import FIXED_ROUNDS  # noqa: E402
from fedsafe.server.config import RunConfig  # noqa: E402
from fedsafe.simulations.run import SimulationOptions, simulate_in_process  # noqa: E402

warnings.filterwarnings("ignore")  # Opacus' "full backward hook" notices


def run_once(args, compress: bool, out: Path) -> dict:
    cfg = RunConfig(model=args.model, dataset=args.dataset, num_rounds=args.rounds, local_epochs=args.local_epochs,
                    epsilon=args.epsilon, lr=args.lr, seed=args.seed, min_nodes=args.nodes,
                    num_partitions=args.nodes, compress_updates=compress, out_dir=str(out))
    started = time.perf_counter()
    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=args.nodes))
    rounds = [h for h in outcome.history if h.get("round", 0) > 0]
    problems = [p for h in rounds for p in h["problems"]]
    if problems:
        raise SystemExit(f"compress-updates={compress}: rounds had problems: {problems[:3]}")
    return {"bytes": [h["upload_bytes"] for h in rounds], "accuracy": outcome.history[-1]["eval"]["accuracy"],
            "epsilon": max(outcome.node_epsilon.values()), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=FIXED_ROUNDS["lr"])  # what a run with its rounds set gets
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        plain = run_once(args, False, Path(scratch) / "plain")
        compressed = run_once(args, True, Path(scratch) / "compressed")
    print(f"{args.model} on {args.dataset}, {args.nodes} nodes, {args.rounds} rounds of {args.local_epochs} local "
          f"epoch(s), DP-SGD ε ≤ {args.epsilon:g} per node (max reported: plain {plain['epsilon']:.3f}, "
          f"compressed {compressed['epsilon']:.3f}), seed {args.seed}")
    print(f"{'':>12} {'bytes/round (mean)':>20} {'final accuracy':>15} {'seconds':>8}")
    for name, result in (("plain", plain), ("compressed", compressed)):
        mean_bytes = sum(result["bytes"]) / len(result["bytes"])
        print(f"{name:>12} {mean_bytes:>20,.0f} {result['accuracy']:>15.4f} {result['seconds']:>8.1f}")
    ratio = sum(plain["bytes"]) / sum(compressed["bytes"])
    points = 100 * (compressed["accuracy"] - plain["accuracy"])
    print(f"ratio: {ratio:.2f}x fewer bytes uploaded; accuracy {points:+.2f} points "
          f"(target: >= 4x, within 1 point: {'met' if ratio >= 4 and abs(points) <= 1 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
