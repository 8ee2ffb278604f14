"""Which engine runs a simulation's virtual nodes: `local` (every node's ClientApp called in this process or
its forked workers, simulations/local.py) or `ray` (Flower's simulation engine, simulations/engine.py);
`auto` picks one.

Imports nothing heavy: the CLI decides before it starts Ray (or does not start it at all).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

BACKENDS = ("auto", "local", "ray")

# `auto` runs up to this many virtual nodes in this process. In process, a node costs one Context until it is
# sampled, and the sampled nodes train on this machine's cores (forked workers, one thread each); Ray costs 8-12
# s of start-up on 2 cores (issue 18: its processes, each actor importing PyTorch, Opacus and Flower) and then
# trains on every core. Small federations are where researchers iterate, and where that start-up is most of the
# run (README, "Which backend", has the measured figures); a federation of thousands of nodes is a scale
# experiment, where Ray's parallel actors and cluster mode pay, and `--backend local` still runs it in one
# process when asked.
LOCAL_MAX_NODES = 1000

# At most this many forked workers by default (a cap chosen, not measured): each is a process holding the
# training stack, and a machine with many more cores is where Ray's engine spreads the work.
MAX_WORKERS = 8


def can_fork_workers() -> bool:
    """Whether this process may fork node workers: Linux, and no CUDA context a child would inherit broken."""
    if not sys.platform.startswith("linux"):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def default_workers() -> int:
    """One worker per core this process may run on (cgroup and affinity limits included), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class BackendError(ValueError):
    """A backend name that does not exist, or one that cannot do what the run asks of it."""


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "local" or "ray"
    reason: str  # why, in a few words, for the line printed at start
    workers: int = 1  # local: the processes the nodes of a round train in (1: this one alone)

    def line(self) -> str:
        where = "every node in this process" if self.name == "local" else "Flower's simulation engine"
        spread = (f"; each round's nodes trained in {self.workers} worker processes forked from it, one thread each"
                  if self.name == "local" and self.workers > 1 else "")
        return f"fedsafe: backend {self.name} ({where}): {self.reason}{spread}"


def choose_backend(backend: str, num_nodes: int, ray_address: str | None = None,
                   client_gpus: float = 0.0, local_workers: int | None = None) -> BackendChoice:
    """The engine for a run of `num_nodes` virtual nodes; BackendError for an unknown name or for `local`
    with what only Ray provides (a cluster, GPUs per node). `local_workers` (None: one per core, where this
    process can fork them) is how many processes the local backend trains a round's nodes in."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if local_workers is not None and local_workers < 1:
        raise BackendError(f"--local-workers must be >= 1; got {local_workers}")
    needs_ray = [flag for flag, asked in (("--ray-address", ray_address), ("--client-gpus", client_gpus)) if asked]
    if backend == "local":
        if needs_ray:
            raise BackendError(f"--backend local runs every node in this process; {' and '.join(needs_ray)} "
                               "need Ray (--backend ray or auto)")
        return _local("asked for (--backend local)", num_nodes, local_workers)
    if local_workers is not None and local_workers > 1 and (backend == "ray" or needs_ray):
        on_ray = " and ".join(needs_ray) or "--backend ray"
        raise BackendError(f"--local-workers sets the local backend's processes; with {on_ray} the nodes run on Ray")
    if backend == "ray":
        return BackendChoice("ray", "asked for (--backend ray)")
    if needs_ray:
        return BackendChoice("ray", f"{' and '.join(needs_ray)} given")
    if num_nodes > LOCAL_MAX_NODES:
        return BackendChoice("ray", f"{num_nodes} nodes, more than the {LOCAL_MAX_NODES} run in process by default")
    return _local(f"{num_nodes} nodes on one host (up to {LOCAL_MAX_NODES}: no Ray start-up)", num_nodes,
                  local_workers)


def _local(reason: str, num_nodes: int, workers: int | None) -> BackendChoice:
    if workers is None:  # one per core, but never more than there are nodes to train
        workers = min(default_workers(), num_nodes) if can_fork_workers() else 1
    elif workers > 1 and not can_fork_workers():
        raise BackendError(f"--local-workers {workers}: this process cannot fork node workers (they need Linux, "
                           "and no CUDA initialised in the driver); use --local-workers 1")
    return BackendChoice("local", reason, workers)
