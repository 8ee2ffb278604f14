"""What a `fedsafe simulate` process costs besides its rounds (issue 18: the whole command, from process start
to exit, is timed against pfl): it imports only what its run uses, and when it ends it skips the interpreter's
final garbage collections over everything PyTorch & co. made (gc.freeze). Checked in a fresh process after a
whole (tiny) run."""

import json
import subprocess
import sys

# Imported by no step of a simulation on built-in data, with the plot helper drawing the figures:
NOT_IMPORTED = (
    "PIL",  # image folders and Hugging Face image sets only (fedsafe.client.image_folder)
    "fedsafe.credentials",  # node keys and certificates (deployment); node names need only its name rules
    "cryptography.x509",  # certificates, imported by fedsafe.credentials alone
    "matplotlib",  # drawn by the plot helper process (fedsafe.server.plots)
)

# An exit handler registered before main() runs after the command's own: what it sees is what the interpreter's
# final collections see.
CODE = """
import atexit, gc, json, sys
atexit.register(lambda: print(json.dumps({{"frozen_at_exit": gc.get_freeze_count()}}), flush=True))
from fedsafe.cli import main
status = main(['simulate', '--dataset', 'digits', '--model', 'mlp', '--nodes', '2', '--rounds', '1',
               '--local-epochs', '1', '--epsilon', '3', '--backend', 'local', '--out', {out!r}])
print(json.dumps({{'status': status, 'imported': [m for m in {names!r} if m in sys.modules]}}), flush=True)
"""


def test_a_simulate_run_imports_no_module_it_does_not_use_and_its_exit_skips_the_final_collections(tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE.format(out=str(tmp_path / "run"), names=NOT_IMPORTED)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ran, ended = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert ran["status"] == 0
    assert (tmp_path / "run" / "metrics.json").is_file()  # the run did run, every step of it
    assert ran["imported"] == []
    assert ended["frozen_at_exit"] > 100_000  # PyTorch's, SciPy's, … objects: none walked again at exit
