"""Which engine runs a simulation's virtual nodes: `local` (every node's ClientApp called in this process,
simulations/local.py) or `ray` (Flower's simulation engine, simulations/engine.py); `auto` picks one.

Imports nothing heavy: the CLI decides before it starts Ray (or does not start it at all).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "local", "ray")

# `auto` runs up to this many virtual nodes in this process. In process, a node costs one Context until it
# is sampled, and the sampled nodes train one after another on one core; Ray costs 8-12 s of start-up on
# 2 cores (issue 18: its processes, each actor importing PyTorch, Opacus and Flower) and then trains on
# every core. Small federations are where researchers iterate, and where that start-up is most of the
# run (README, "Which backend", has the measured figures); a federation of thousands of nodes is a
# scale experiment, where Ray's parallel actors and cluster mode pay, and `--backend local` still runs
# it in one process when asked.
LOCAL_MAX_NODES = 1000


class BackendError(ValueError):
    """A backend name that does not exist, or one that cannot do what the run asks of it."""


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "local" or "ray"
    reason: str  # why, in a few words, for the line printed at start

    def line(self) -> str:
        where = "every node in this process" if self.name == "local" else "Flower's simulation engine"
        return f"fedsafe: backend {self.name} ({where}): {self.reason}"


def choose_backend(backend: str, num_nodes: int, ray_address: str | None = None,
                   client_gpus: float = 0.0) -> BackendChoice:
    """The engine for a run of `num_nodes` virtual nodes; BackendError for an unknown name or for `local`
    with what only Ray provides (a cluster, GPUs per node)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    needs_ray = [flag for flag, asked in (("--ray-address", ray_address), ("--client-gpus", client_gpus)) if asked]
    if backend == "local":
        if needs_ray:
            raise BackendError(f"--backend local runs every node in this process; {' and '.join(needs_ray)} "
                               "need Ray (--backend ray or auto)")
        return BackendChoice("local", "asked for (--backend local)")
    if backend == "ray":
        return BackendChoice("ray", "asked for (--backend ray)")
    if needs_ray:
        return BackendChoice("ray", f"{' and '.join(needs_ray)} given")
    if num_nodes > LOCAL_MAX_NODES:
        return BackendChoice("ray", f"{num_nodes} nodes, more than the {LOCAL_MAX_NODES} run in process by default")
    return BackendChoice("local", f"{num_nodes} nodes on one host (up to {LOCAL_MAX_NODES}: no Ray start-up)")
