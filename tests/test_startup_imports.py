"""What a `fedsafe simulate` process imports: only what its run uses. Every module imported is start-up time
of every run (issue 18: the whole command, imports included, is timed against pfl), so modules the default
run never calls stay out of it, checked in a fresh process after a whole (tiny) run."""

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


def test_a_simulate_run_imports_no_module_it_does_not_use(tmp_path):
    code = (
        "import json, sys\n"
        "from fedsafe.cli import main\n"
        f"status = main(['simulate', '--dataset', 'digits', '--model', 'mlp', '--nodes', '2', '--rounds', '1', "
        f"'--local-epochs', '1', '--epsilon', '3', '--backend', 'local', '--out', {str(tmp_path / 'run')!r}])\n"
        f"print(json.dumps({{'status': status, 'imported': [m for m in {NOT_IMPORTED!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 0
    assert (tmp_path / "run" / "metrics.json").is_file()  # the run did run, every step of it
    assert result["imported"] == []
