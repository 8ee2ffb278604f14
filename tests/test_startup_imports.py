"""What a `fedsafe simulate` process costs besides its rounds (issue 18: the whole command, from process start
to exit, is timed against pfl): it imports only what its run uses; what those imports made is frozen
(gc.freeze), so that no garbage collection walks it again, in the rounds or at exit; and what the command
imports up front for that is what the run would import anyway. Checked in fresh processes after whole (tiny)
runs."""

import json
import subprocess
import sys

from fedsafe.cli import SIMULATION_IMPORTS

# Imported by no step of a simulation on built-in data, with the plot helper drawing the figures:
NOT_IMPORTED = (
    "PIL",  # image folders and Hugging Face image sets only (fedsafe.client.image_folder)
    "fedsafe.credentials",  # node keys and certificates (deployment); node names need only its name rules
    "cryptography.x509",  # certificates, imported by fedsafe.credentials alone
    "matplotlib",  # drawn by the plot helper process (fedsafe.server.plots)
)
RUN = ["simulate", "--dataset", "digits", "--model", "mlp", "--nodes", "2", "--rounds", "1", "--local-epochs", "1",
       "--epsilon", "3", "--backend", "local"]

# As the `fedsafe` script runs it (fedsafe.cli.command, its entry point), with the arguments in sys.argv. An
# exit handler registered before it runs after the command's own: what it sees the final collections see.
AS_THE_COMMAND = """
import atexit, gc, json, sys
atexit.register(lambda: print(json.dumps({{"frozen_at_exit": gc.get_freeze_count()}}), flush=True))
from fedsafe.cli import command
sys.argv = ["fedsafe", *{args!r}]
status = command()
print(json.dumps({{"status": status, "frozen": gc.get_freeze_count(), "collector_on": gc.isenabled(),
                   "imported": [m for m in {names!r} if m in sys.modules]}}), flush=True)
"""

# As a program calling main() runs it: no start-up imports of the command's own.
AS_A_CALL = """
import json, sys
from fedsafe.cli import main
status = main({args!r})
print(json.dumps({{"status": status, "imported": [m for m in {names!r} if m in sys.modules]}}), flush=True)
"""


def _run(code: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]


def test_a_simulate_command_imports_no_module_it_does_not_use_and_no_collection_walks_its_libraries(tmp_path):
    ran, ended = _run(AS_THE_COMMAND.format(args=[*RUN, "--out", str(tmp_path / "run")], names=NOT_IMPORTED))
    assert ran["status"] == 0
    assert (tmp_path / "run" / "metrics.json").is_file()  # the run did run, every step of it
    assert ran["imported"] == []
    assert ran["frozen"] > 100_000  # PyTorch's, SciPy's, … objects, frozen once imported: before the rounds
    assert ran["collector_on"]  # the collector itself is on again for the rounds and whatever follows
    # ... and still frozen at exit, so the final collections walk none of it. (Exit handlers that run after the
    # freeze at exit, such as logging's, may free a few hundred frozen objects: not a count that must grow.)
    assert ended["frozen_at_exit"] >= 0.99 * ran["frozen"]


def test_what_a_simulate_command_imports_up_front_its_run_imports_anyway(tmp_path):
    (ran,) = _run(AS_A_CALL.format(args=[*RUN, "--out", str(tmp_path / "run")], names=SIMULATION_IMPORTS))
    assert ran["status"] == 0
    assert ran["imported"] == list(SIMULATION_IMPORTS)  # so importing them first adds nothing to a run
