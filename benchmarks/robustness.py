"""Robust aggregation under simulated attackers, and what SecAgg+ costs — in-process, no Ray.

    python -m benchmarks.robustness                     # 7 nodes, 2 attackers (sign-flip ×5), 3 rounds
    python -m benchmarks.robustness --attack scale --factor 20 --attackers 1 --nodes 5

Prints per strategy the final test accuracy without and with attackers, then plain FedAvg against
FedAvg over SecAgg+ (seconds per round, bytes per round both ways, largest difference of the models).
The attack (simulations/attacks.py) is a research/test tool: only the simulation driver wires it in.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

ROBUST = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def _cfg(out: str, **overrides):
    from fedsafe.server.config import RunConfig

    base = dict(num_rounds=3, local_epochs=1, dp=False, out_dir=out)
    return RunConfig(**{**base, **overrides})


def _run(cfg, nodes: int, attack: str = "none", attackers: int = 0, factor: float = 5.0):
    from fedsafe.server.app import build_run_strategy, global_model_setup
    from fedsafe.server.loop import run_rounds
    from fedsafe.simulations.local import LocalGrid
    from fedsafe.simulations.run import SimulationOptions, _simulated_federation

    options = SimulationOptions(num_nodes=nodes, attack=attack, attackers=attackers, attack_factor=factor)
    cfg, client_app = _simulated_federation(cfg, options)
    grid = LocalGrid(client_app, nodes)
    strategy = build_run_strategy(cfg)
    initial, model_config, evaluator = global_model_setup(cfg)
    started = time.perf_counter()
    outcome = run_rounds(grid, cfg, strategy, initial, model_config, evaluator)
    return outcome, grid, time.perf_counter() - started


def strategy_params(name: str, nodes: int, attackers: int) -> dict:
    if name in ("krum", "multikrum"):
        return {"num_malicious": min(attackers, (nodes - 3) // 2)}
    if name == "bulyan":
        return {"num_malicious": min(attackers, (nodes - 3) // 4)}
    if name == "fedtrimmedavg":
        return {"trim_beta": min(0.49, max(0.2, (attackers + 0.5) / nodes))}
    return {}


def robustness_table(nodes: int, attackers: int, attack: str, factor: float, rounds: int, dp: bool):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ROBUST:
            params = strategy_params(name, nodes, attackers)
            accs = []
            for label, kind, count in (("clean", "none", 0), ("attacked", attack, attackers)):
                cfg = _cfg(os.path.join(tmp, f"{name}-{label}"), strategy=name, num_rounds=rounds, dp=dp, **params)
                outcome, _, _ = _run(cfg, nodes, kind, count, factor)
                accs.append(outcome.history[-1]["eval"]["accuracy"])
            rows.append((name, params, *accs))
    return rows


def secagg_overhead(nodes: int, rounds: int, dp: bool):
    import numpy as np

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, secagg in (("plain", False), ("secagg", True)):
            cfg = _cfg(os.path.join(tmp, label), num_rounds=rounds, dp=dp, secagg=secagg)
            outcome, grid, seconds = _run(cfg, nodes)
            rounds_run = [h for h in outcome.history if h["round"] > 0]
            out[label] = dict(seconds=seconds / rounds,
                              down=sum(h["download_bytes"] for h in rounds_run) / rounds,
                              up=sum(h["upload_bytes"] for h in rounds_run) / rounds,
                              acc=outcome.history[-1]["eval"]["accuracy"],
                              arrays=outcome.arrays, protocol=[h.get("secagg", {}).get("protocol_seconds", 0.0)
                                                               for h in outcome.history if h["round"] > 0])
        diff = max(float(np.max(np.abs(out["plain"]["arrays"][k].numpy() - out["secagg"]["arrays"][k].numpy())))
                   for k in out["plain"]["arrays"].keys())
    return out, diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=7)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--attack", default="sign-flip", choices=("scale", "sign-flip"))
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true", help="nodes train with DP-SGD (ε=3) instead of plain SGD")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.disable(logging.INFO)  # Flower and the SecAgg+ mod log every stage of every node
    import torch

    torch.set_num_threads(1)
    print(f"MLP on breast-cancer, {args.nodes} nodes, {args.rounds} rounds, "
          f"{'DP-SGD ε=3' if args.dp else 'no DP'}; attack: {args.attackers} node(s) {args.attack} ×{args.factor:g}")
    print(f"{'strategy':<14} {'parameters':<26} {'clean':>7} {'attacked':>9}")
    for name, params, clean, attacked in robustness_table(args.nodes, args.attackers, args.attack, args.factor,
                                                          args.rounds, args.dp):
        text = ", ".join(f"{k.replace('_', '-')}={v:g}" for k, v in params.items()) or "-"
        print(f"{name:<14} {text:<26} {clean:>7.3f} {attacked:>9.3f}")
    overhead, diff = secagg_overhead(args.nodes, args.rounds, args.dp)
    plain, sec = overhead["plain"], overhead["secagg"]
    print(f"\nSecAgg+ vs plain FedAvg ({args.nodes} nodes, per round, in-process: no network time)")
    print(f"{'':<8} {'seconds':>8} {'bytes to nodes':>15} {'bytes from nodes':>17} {'accuracy':>9}")
    for label, row in (("plain", plain), ("secagg", sec)):
        print(f"{label:<8} {row['seconds']:>8.2f} {row['down']:>15,.0f} {row['up']:>17,.0f} {row['acc']:>9.3f}")
    print(f"overhead: ×{sec['seconds'] / plain['seconds']:.2f} time (protocol alone "
          f"{sum(sec['protocol']) / len(sec['protocol']):.2f} s/round), ×{sec['down'] / plain['down']:.2f} bytes down, "
          f"×{sec['up'] / plain['up']:.2f} bytes up; largest model difference after {args.rounds} rounds: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
