"""Ray for Flower's simulation engine: started early, on this machine, quietly.

The pieces of Flower's engine that fedsafe replaces (dispatcher, actor warm-up, seeded node ids) are in
fedsafe/flower/simulation.py and fedsafe/flower/linkstate.py.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default, and it stops Ray's warning
}


def quiet_flower_environment() -> None:
    """No telemetry, no update checks, no runtime `uv sync`: offline and reproducible."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


def start_local_ray(ray_address: str | None, verbose: bool) -> LocalRay | None:
    """Ray for a simulation on this machine, starting now in the background (LocalRay); None when the
    simulation joins the cluster at `ray_address` (Flower connects to it)."""
    quiet_flower_environment()
    return None if ray_address else LocalRay(int(os.cpu_count() or 1), verbose)


class RayStartError(RuntimeError):
    """The private Ray instance of a simulation did not start (e.g. its raylet timed out on a loaded machine)."""


class LocalRay:
    """Ray on this machine, started in a background thread so that its processes boot while the driver
    validates the run and prepares the federation (3-4 s on 2 cores, otherwise spent waiting).

    Started as Flower would start it, less Flower's job-wide `runtime_env`: a job with a runtime_env
    cannot use the worker processes Ray starts at init, so every actor waited for a fresh one. The
    driver's import path reaches the workers through PYTHONPATH, which they inherit from the raylet.
    The thread lives until `release()`: Ray's processes are bound to the thread that spawned them
    (parent-death signal), and die with it.
    """

    def __init__(self, num_cpus: int, verbose: bool) -> None:
        self._kwargs = {
            # A private instance, always: without an address Ray joins a cluster it finds on this machine
            # (RAY_ADDRESS, or the last `ray start`) and then refuses num_cpus; fedsafe joins a cluster
            # only when told to (--ray-address), and never stops one it did not start.
            "address": "local",
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,  # the virtual nodes' own lines; the coordinator reports refusals
            # Quiet unless verbose: Ray's start-up notice and its warning that a background thread
            # cannot install Ray's SIGTERM handler (a terminated driver still takes Ray down with it).
            "logging_level": logging.INFO if verbose else logging.ERROR,
        }
        self._error: BaseException | None = None
        self._started = False  # False: Ray was already up in this process (not ours to shut down)
        self._up = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedsafe-ray", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import ray

            if not ray.is_initialized():
                paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
                os.environ["PYTHONPATH"] = os.pathsep.join(paths)
                ray.init(**self._kwargs)
                self._started = True
        except BaseException as err:  # re-raised in the driver's thread by ready()
            self._error = err
        finally:
            self._up.set()
        self._released.wait()

    def ready(self) -> None:
        """Wait until Ray is up; RayStartError, in one line, if it could not start (the caller still releases)."""
        self._up.wait()
        if isinstance(self._error, Exception):
            first_line = (str(self._error).strip().splitlines() or [type(self._error).__name__])[0]
            raise RayStartError(f"Ray could not start on this machine: {first_line}") from self._error
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        """Shut down the Ray this started (Flower has already, if the run got that far); end the thread."""
        self._up.wait()
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
        self._released.set()
        self._thread.join()
