"""The run's plots, drawn here or by a helper process beside the run.

matplotlib is a fifth of a small simulation's CPU time: importing it (~0.5-1 s) and drawing the run's three
figures (~1.3 s on this project's 2 cores). The run itself trains on one core (one thread per virtual
node), so inside `plots_in_background()` a helper process imports matplotlib while the run starts and
draws each figure while the run goes on. The run waits for it before it returns: every file is there when
its results are listed. A figure the helper could not draw (it failed to start, died, or the figure
raised) is drawn in the run's own process instead, as without the helper — nothing is lost, and an error
in a figure is the error it always was.

The helper runs only the drawings named in DRAWINGS, with JSON arguments the run sends it on its stdin.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

DRAWINGS = {
    "partitions": ("fedsafe.simulations.partition_report", "draw_partitions"),
    "results": ("fedsafe.server.results", "draw_results"),
}

_helper: PlotHelper | None = None  # the helper of the plots_in_background() block this process is in


def draw(kind: str, *args: Any) -> None:
    """Draw `kind` with `args` (JSON values): by the helper inside plots_in_background(), else now."""
    if _helper is not None and _helper.submit(kind, args):
        return
    drawing(kind)(*args)


def drawing(kind: str) -> Callable[..., None]:
    module, name = DRAWINGS[kind]
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def plots_in_background() -> Iterator[None]:
    """Figures drawn inside this block go to a helper process (on a machine with a second core); the block
    ends when they are all drawn."""
    global _helper
    if _helper is not None or (os.cpu_count() or 1) < 2:
        yield
        return
    helper = _helper = PlotHelper.start()
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # the user stops the run: stop the helper too, draw nothing more
        if helper is not None:
            helper.stop()
            helper = None
        raise
    finally:
        _helper = None
        if helper is not None:
            helper.finish()


class PlotHelper:
    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.jobs: list[tuple[str, tuple]] = []

    @classmethod
    def start(cls) -> PlotHelper | None:
        try:
            process = subprocess.Popen([sys.executable, "-m", "fedsafe.server.plots"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as err:
            log.debug("no plot helper (%s): figures drawn in this process", err)
            return None
        return cls(process)

    def submit(self, kind: str, args: tuple) -> bool:
        try:
            line = json.dumps({"kind": kind, "args": list(args)})
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError, TypeError):  # the helper is gone, or the arguments are not JSON
            return False
        self.jobs.append((kind, args))
        return True

    def stop(self) -> None:
        """End the helper now, whatever it has left to draw."""
        self.process.kill()
        self.process.communicate()

    def finish(self) -> None:
        """Wait for the helper; draw here what it did not."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        answers = self.process.stdout.read().splitlines()
        self.process.wait()
        for (kind, args), answer in zip(self.jobs, [*answers, *[""] * len(self.jobs)]):
            if answer != "ok":
                log.debug("plot helper did not draw %s (%s): drawing it here", kind, answer or "no answer")
                drawing(kind)(*args)


def main() -> None:
    """The helper: matplotlib imported first, then one drawing per line on stdin, one answer per line."""
    with contextlib.suppress(OSError):  # the run's nodes train on every core: the figures take what they leave
        os.nice(10)
    gc.disable()  # matplotlib's objects are none of them garbage: imported with the collector paused, then frozen
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported while the run starts, not when its first figure is due

    gc.freeze()  # so the collections while drawing walk the figures' objects, not matplotlib's
    gc.enable()
    for line in sys.stdin:
        try:
            job = json.loads(line)
            drawing(job["kind"])(*job["args"])
        except Exception as err:  # noqa: BLE001 - answered; the run draws it again and sees the error itself
            print(f"failed: {type(err).__name__}: {err}".replace("\n", " "), flush=True)
        else:
            print("ok", flush=True)
    # The run waits for this process to end: its final garbage collections (every matplotlib object, ~0.1 s
    # of CPU) would be the last thing a run waits for. Frozen, they are skipped; nothing is left to draw.
    gc.freeze()


if __name__ == "__main__":
    main()
