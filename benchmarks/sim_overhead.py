"""Simulation overhead: the same federated workload as a fedsafe simulation and as a plain loop over the same
local DP training steps, measured in one run; plus the largest client count and peak memory of the whole
process tree.

    python benchmarks/sim_overhead.py [--clients 100] [--per-round 10] [--rounds 10] [--scale 10000]
                                      [--backend local|ray|auto] [--local-workers N] [--repeats 3]

Targets (issue 18, the local backend, the default here): start-up <= 3 s, and the whole run <= 1.25x the plain
loop *including* start-up. The local backend runs as `fedsafe simulate` does, its nodes spread over one forked
worker per core unless --local-workers says otherwise; the plain loop is one process on one core, so the
CPU-seconds ratio printed beside the wall-time one says what the simulation costs in all. With --backend ray
(issue 5's targets): start-up <= 10 s, and the rest of the run <= 1.25x the plain loop. The load average is
printed with the figures (the machine is shared); figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakMemory:
    """Peak proportional set size (PSS) of this process and all its descendants (Ray's included)."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(cfg, clients: int) -> float:
    """The same rounds, sampled nodes, and local DP-SGD steps as the simulation, in one process."""
    import torch

    from fedsafe.client.accounting import calibrate_noise
    from fedsafe.client.data import PartitionScheme, load_partition
    from fedsafe.client.training import TrainSettings, poisson_schedule, train
    from fedsafe.models import build_model, task_for
    from fedsafe.server.app import global_model_setup
    from fedsafe.server.sampling import NodeSampler

    forget_calibrations()
    started = time.perf_counter()
    initial, model_config, evaluator = global_model_setup(cfg)
    spec_task = task_for(model_config["task"], model_config["num-classes"])
    scheme = PartitionScheme(cfg.partitioner, clients, cfg.alpha, seed=cfg.seed)
    sampler = NodeSampler(cfg.seed, cfg.fraction_train, clients)
    global_state = initial.to_torch_state_dict()
    for _ in range(cfg.num_rounds):
        states, weights = [], []
        for node in sampler.sample(list(range(clients))):
            data = load_partition(cfg.dataset, node, scheme)
            q, batches = poisson_schedule(len(data), cfg.batch_size)
            steps = batches * cfg.local_epochs
            sigma = calibrate_noise([], q, steps * cfg.num_rounds, cfg.epsilon, cfg.delta)
            model = build_model(cfg.model, data.spec)
            model.load_state_dict(global_state)
            train(model, spec_task, data, TrainSettings(
                local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                max_grad_norm=cfg.max_grad_norm, noise_multiplier=sigma), torch.device("cpu"))
            states.append(model.state_dict())
            weights.append(len(data))
        global_state = {k: sum(w * s[k] for w, s in zip(weights, states)) / sum(weights) for k in states[0]}
        from flwr.app import ArrayRecord

        evaluator(ArrayRecord(global_state))
    return time.perf_counter() - started


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have ended (the
    simulation's plot helper); not Ray's processes, which outlive the measurement."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def warm_up_training_stack(cfg) -> None:
    """Import what both measurements first use mid-run: PyTorch's compiler stack (torch._dynamo, which
    `optimizer.step()` imports on its first call: ~1 s) and the evaluation's metrics (scikit-learn's), by
    evaluating the initial model once. Left to the first measurement, they were charged to it alone."""
    import torch._dynamo  # noqa: F401

    from fedsafe.server.app import global_model_setup

    initial, _, evaluator = global_model_setup(cfg)
    evaluator(initial)


def forget_calibrations() -> None:
    """Empty the accounting's caches (σ calibrations, RDP curves): each measurement pays for calibrating
    its own σ, as a fresh process does, instead of the second one reusing the first one's."""
    from fedsafe.client import accounting

    accounting.use_disk_cache(None)
    accounting._calibrate.cache_clear()
    accounting._rdp_per_step.cache_clear()


def simulation(cfg, clients: int, backend: str, client_cpus: float = 1.0, local_workers: int | None = None):
    """(total, start-up, steady round, shut-down seconds, outcome) of one fedsafe simulation.

    Start-up: from the call to the first round's start, plus what round 1 took beyond a steady round
    (Ray and the actors booting; in process, the training stack's first use). Shut-down: from the last
    round's end to the call's return (results, plots, Ray stopping)."""
    from fedsafe.simulations.run import SimulationOptions, simulate

    round_ends: list[float] = []
    forget_calibrations()
    called = time.perf_counter()
    options = SimulationOptions(num_nodes=clients, client_cpus=client_cpus, backend=backend,
                                local_workers=local_workers)
    outcome = simulate(cfg, options,
                       progress=lambda _record, _cfg: round_ends.append(time.perf_counter()))
    returned = time.perf_counter()
    rounds = [h["seconds"] for h in outcome.history if h["round"] > 0]
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    startup = (outcome.started_at - called) + max(0.0, rounds[0] - steady)
    return returned - called, startup, steady, returned - round_ends[-1], outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=int, default=10_000, help="client count for the scale run (0: skip)")
    parser.add_argument("--backend", default="local", choices=("auto", "local", "ray"))
    parser.add_argument("--repeats", type=int, default=3, help="simulation/plain-loop pairs; medians reported")
    parser.add_argument("--local-workers", type=int, default=None,
                        help="the local backend's worker processes (default: as `fedsafe simulate`, one per core)")
    args = parser.parse_args()

    import logging
    import os

    import torch

    from fedsafe.server.config import RunConfig
    from fedsafe.simulations.run import quiet_flower_environment

    quiet_flower_environment()
    torch.set_num_threads(1)  # as each simulated node trains: one actor per core, one thread each
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with TemporaryDirectory() as tmp:
        cfg = RunConfig(num_rounds=args.rounds, model="mlp", dataset="synthetic", epsilon=3.0, local_epochs=1,
                        fraction_train=args.per_round / args.clients, out_dir=f"{tmp}/sim")
        # What either way needs first (PyTorch, Flower, flwr-datasets imports; the data; the model), paid once
        # here so that neither measurement below is charged for it.
        from fedsafe.simulations.run import SimulationOptions, validate_against_data

        warm_started = time.perf_counter()
        validate_against_data(cfg, SimulationOptions(num_nodes=args.clients))
        warm_up_training_stack(cfg)
        driver_warmup = time.perf_counter() - warm_started
        pairs = []  # (simulation: total, start-up, steady round, shut-down, CPU; plain loop: total, CPU)
        for repeat in range(args.repeats):  # back to back, alternating: load swings hit both alike
            run_cfg = RunConfig(**{**cfg.__dict__, "out_dir": f"{tmp}/sim-{repeat}"})
            cpu_started = cpu_seconds()
            sim_total, startup, steady, shutdown, _ = simulation(run_cfg, args.clients, args.backend,
                                                                 local_workers=args.local_workers)
            sim_cpu, cpu_started = cpu_seconds() - cpu_started, cpu_seconds()
            plain_total = plain_loop(run_cfg, args.clients)
            pairs.append((sim_total, startup, steady, shutdown, sim_cpu, plain_total, cpu_seconds() - cpu_started))
        load = os.getloadavg()
        choice = SimulationOptions(num_nodes=args.clients, backend=args.backend,
                                   local_workers=args.local_workers).backend_choice()
        local = choice.name == "local"
        print(f"\nworkload: {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, "
              f"MLP on synthetic ({cfg.local_epochs} local epoch, DP-SGD), {os.cpu_count()} CPUs, "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; medians of {args.repeats} pairs")
        for sim_total, startup, steady, shutdown, sim_cpu, plain_total, plain_cpu in pairs:
            print(f"  pair: simulation {sim_total:5.1f} s (CPU {sim_cpu:.1f} s), plain loop {plain_total:5.1f} s "
                  f"(CPU {plain_cpu:.1f} s): {sim_total / plain_total:.2f}x wall, {sim_cpu / plain_cpu:.2f}x CPU")
        sim_total, startup, steady, shutdown, sim_cpu, plain_total, plain_cpu = (
            statistics.median(column) for column in zip(*pairs))
        print(f"plain loop               {plain_total:8.1f} s   (CPU {plain_cpu:.1f} s)")
        print(f"fedsafe simulation       {sim_total:8.1f} s   (CPU {sim_cpu:.1f} s; backend {choice.name}"
              f"{f', {choice.workers} workers' if local else ''}: start-up {startup:.1f} s, "
              f"steady round {steady:.2f} s, shut-down {shutdown:.1f} s)")
        print(f"start-up                 {startup:8.1f} s   (target <= {3 if local else 10} s)")
        ratios = [p[0] / p[5] for p in pairs]
        print(f"ratio with start-up      {statistics.median(ratios):8.2f}x   "
              + ("(target <= 1.25)" if local else f"(a fixed cost over a {plain_total:.0f} s workload)"))
        print(f"ratio of CPU seconds     {statistics.median(p[4] / p[6] for p in pairs):8.2f}x   "
              "(steadier than wall time on a shared machine)")
        print(f"ratio excluding start-up {statistics.median((p[0] - p[1]) / p[5] for p in pairs):8.2f}x"
              + ("" if local else "   (target <= 1.25)"))
        print(f"driver imports and data  {driver_warmup:8.1f} s   (before both measurements, charged to neither)")
        cpus = os.cpu_count() or 1
        if cpus > 1 and not local:
            one_actor = RunConfig(**{**cfg.__dict__, "out_dir": f"{tmp}/sim-one-actor"})
            _, _, steady_one, _, _ = simulation(one_actor, args.clients, args.backend, client_cpus=float(cpus))
            print(f"actors: {cpus} actors × 1 CPU (default) steady round {steady:.2f} s; "
                  f"1 actor × {cpus} CPUs steady round {steady_one:.2f} s")
        if args.scale:
            scale_cfg = RunConfig(num_rounds=2, model="mlp", dataset="synthetic", epsilon=3.0, local_epochs=1,
                                  fraction_train=100 / args.scale, out_dir=f"{tmp}/scale")
            with PeakMemory() as memory:
                total, _, _, _, outcome = simulation(scale_cfg, args.scale, args.backend)
            print(f"scale: {args.scale} clients (backend {args.backend}), 100 per round, 2 rounds in {total:.1f} s; "
                  f"replies {[h['replies'] for h in outcome.history if h['round'] > 0]}; "
                  f"peak PSS of the process tree {memory.peak_bytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
