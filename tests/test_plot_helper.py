"""The run's figures drawn by a helper process (fedsafe.server.plots): the same files, there when the run ends,
and drawn in the run's own process whenever the helper does not draw them."""

import subprocess
import sys

import pytest

from fedsafe.server import plots
from fedsafe.server.results import ResultsWriter

HISTORY = [
    {"round": 0, "eval": {"accuracy": 0.1, "loss": 2.3}, "epsilon_max": None},
    {"round": 1, "eval": {"accuracy": 0.5, "loss": 1.9}, "epsilon_max": 1.5, "node_epsilon": {"7": 1.5, "9": 1.4}},
    {"round": 2, "eval": {"accuracy": 0.7, "loss": float("nan")}, "epsilon_max": 2.9, "node_epsilon": {"7": 2.9}},
]
CONFIG = {"model": "mlp", "dataset": "digits"}


def _never_here(*_args):
    raise AssertionError("drawn in the run's process, not by the helper")


def test_the_helper_draws_the_figures_the_run_would_draw_and_they_exist_when_the_block_ends(tmp_path, monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    ResultsWriter(here, CONFIG).plot(HISTORY)  # no helper: drawn in this process, as always
    monkeypatch.setattr(plots, "drawing", lambda kind: _never_here)  # from here on only the helper may draw
    with plots.plots_in_background():
        ResultsWriter(there, CONFIG).plot(HISTORY)
    for name in ("accuracy_epsilon.png", "rounds.png"):
        assert (there / name).read_bytes() == (here / name).read_bytes()  # the same figure, byte for byte


def test_the_helper_process_imports_matplotlib_the_run_does_not(tmp_path):
    code = ("import sys; from fedsafe.server import plots; from fedsafe.server.results import ResultsWriter\n"
            f"with plots.plots_in_background():\n"
            f"    ResultsWriter(__import__('pathlib').Path({str(tmp_path)!r}), {CONFIG!r}).plot({HISTORY!r})\n"
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code.replace("nan", "float('nan')")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "rounds.png").stat().st_size > 10_000


def test_a_figure_the_helper_does_not_draw_is_drawn_in_the_run(tmp_path):
    with plots.plots_in_background():
        plots._helper.process.kill()  # the helper dies before the run's figures are due
        plots._helper.process.wait()
        ResultsWriter(tmp_path, CONFIG).plot(HISTORY)
    assert (tmp_path / "accuracy_epsilon.png").stat().st_size > 10_000


def test_a_figure_that_fails_fails_the_run_as_without_the_helper(tmp_path):
    with pytest.raises(KeyError), plots.plots_in_background():
        ResultsWriter(tmp_path, CONFIG).plot([{"eval": {"accuracy": 0.5}}])  # a round without its number
    assert plots._helper is None


def test_a_run_stopped_by_the_user_stops_its_helper_without_drawing(tmp_path):
    with pytest.raises(KeyboardInterrupt), plots.plots_in_background():
        helper = plots._helper
        ResultsWriter(tmp_path, CONFIG).plot(HISTORY)
        raise KeyboardInterrupt
    assert helper.process.returncode is not None  # ended, not left running
    assert plots._helper is None


def test_the_helper_draws_without_importing_pytorch():
    """The helper imports only what its drawings need: PyTorch (1.7 s of CPU) stays in the run's process."""
    code = ("import sys; from fedsafe.server import plots\n"
            "[plots.drawing(kind) for kind in plots.DRAWINGS]\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
