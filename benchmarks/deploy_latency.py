"""Seconds per round of a real deployment on 127.0.0.1: SuperLink + SuperNodes, TLS and node auth on.

    python benchmarks/deploy_latency.py                 # 2 nodes, 5 rounds, warm start (fedsafe's default)
    python benchmarks/deploy_latency.py --cold-start    # Flower's default: a fresh process per message
    python benchmarks/deploy_latency.py --nodes 3 --rounds 8 --keep /tmp/bench

Everything is started through the fedsafe CLI (`fedsafe superlink`, `fedsafe node`) and `flwr run`,
as in docs/deployment.md; the model is the small MLP on breast-cancer (each node holds a share of the
training split), DP-SGD on, 1 local epoch. Reported, from the coordinator's metrics.json:

* seconds per round (round 1 apart: it also calibrates the nodes' noise for the run), and the part
  of it spent waiting for replies;
* each ClientApp's time from its process start to its training libraries loaded, taken before the node
  reads any record (`startup-seconds`, reported by the node; earlier versions ran it to the first training
  step, data loading and ledger reservation included), per round;
* `flwr run` wall time, and the time until the first round started (FAB, ServerApp start, sampling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.deploy_harness import Federation, flower_available, write_node_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--cold-start", action="store_true", help="no warm start on the nodes or the SuperLink")
    parser.add_argument("--keep", default=None, help="keep logs and results in this directory")
    args = parser.parse_args(argv)
    if not flower_available():
        print("Flower binaries not found next to this Python", file=sys.stderr)
        return 2

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedsafe-bench-"))
    cold = ["--cold-start"] if args.cold_start else []
    names = [f"node{i}" for i in range(args.nodes)]
    t0 = time.monotonic()
    with Federation(root) as fed:
        data = write_node_data(root / "data", args.nodes)
        if args.cold_start:
            fed.superlink = fed.start("superlink", fed.fedsafe(
                "superlink", "--certs", str(root / "certs"), "--database", str(root / "state" / "superlink.db"),
                "--port", str(fed.port), "--cold-start"))
            from tests.deploy_harness import wait_for_tls

            wait_for_tls(fed.port, fed.ca, fed.superlink, time.monotonic() + 60)
        else:
            fed.start_superlink()
        for name in names:
            fed.register(name)
        for name, path in zip(names, data):
            fed.start_node(name, path, extra=cold)
        for name in names:
            fed.wait_connected(name)
            if not args.cold_start:
                fed.wait_warm(name)
        setup = time.monotonic() - t0
        out = root / "out"
        started = time.monotonic()
        status, output = fed.run({"num-rounds": args.rounds, "local-epochs": args.local_epochs,
                                  "min-nodes": args.nodes, "out-dir": str(out)}, timeout=600, name="bench")
        wall = time.monotonic() - started
    if status != 0:
        print(output[-4000:], file=sys.stderr)
        return 1

    rounds = [r for r in json.loads((out / "metrics.json").read_text())["rounds"] if r["round"] >= 1]
    seconds = [r["seconds"] for r in rounds]
    startups = [s for r in rounds for s in r.get("clientapp_startup_seconds", {}).values()]
    first_startups = list(rounds[0].get("clientapp_startup_seconds", {}).values())
    later_startups = [s for r in rounds[1:] for s in r.get("clientapp_startup_seconds", {}).values()]
    mode = "cold start (a fresh process per message)" if args.cold_start else "warm start (forked ClientApps)"
    print(f"fedsafe deploy latency: {args.nodes} nodes, {args.rounds} rounds, mlp/breast-cancer, DP-SGD, "
          f"TLS + node auth, 127.0.0.1, {mode}")
    print(f"setup (certs, SuperLink, registration, nodes ready): {setup:.1f} s")
    print(f"flwr run wall time: {wall:.1f} s; before round 1 (FAB, ServerApp start, sampling): "
          f"{wall - sum(seconds):.1f} s")
    print("round  seconds  waiting  ClientApp start→first step (per node)")
    for r in rounds:
        starts = ", ".join(f"{s:.2f}" for s in r.get("clientapp_startup_seconds", {}).values())
        print(f"{r['round']:>5}  {r['seconds']:7.2f}  {r.get('wait_seconds', float('nan')):7.2f}  {starts}")
    steady = seconds[1:] or seconds
    summary = {
        "nodes": args.nodes, "rounds": args.rounds, "warm_start": not args.cold_start,
        "round1_seconds": seconds[0], "steady_seconds_mean": statistics.mean(steady),
        "steady_seconds_median": statistics.median(steady), "steady_seconds_max": max(steady),
        "clientapp_start_to_first_step_round1_mean": statistics.mean(first_startups) if first_startups else None,
        "clientapp_start_to_first_step_later_mean": statistics.mean(later_startups) if later_startups else None,
        "clientapp_start_to_first_step_all_mean": statistics.mean(startups) if startups else None,
        "flwr_run_wall_seconds": wall, "setup_seconds": setup,
    }
    print(f"seconds per round after round 1: mean {summary['steady_seconds_mean']:.2f}, median "
          f"{summary['steady_seconds_median']:.2f}, max {summary['steady_seconds_max']:.2f} (round 1: {seconds[0]:.2f})")
    if later_startups:
        print(f"ClientApp start→first training step: {summary['clientapp_start_to_first_step_later_mean']:.2f} s "
              f"(mean after round 1; round 1: {summary['clientapp_start_to_first_step_round1_mean']:.2f} s)")
    print(json.dumps(summary))
    if args.keep:
        print(f"logs and results: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
