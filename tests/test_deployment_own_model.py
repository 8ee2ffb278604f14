"""A user's own model on real nodes (issue 11.1): `fedsafe superlink`, `fedsafe node` and `flwr run` as
processes on 127.0.0.1 (TLS, node authentication), the model a factory in a package the operators
installed themselves — not part of the app package the SuperLink ships.

Nodes `a` and `b` have the package and list it in `--allow-models`; node `c` never installed it. The
coordinator names `hospital_models.nets:build_model`; `a` and `b` train it under DP-SGD, `c` refuses each
round with MODEL_UNAVAILABLE and a line in its own output naming the module, and the run goes on.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from fedsafe.protocol import MODEL_UNAVAILABLE
from tests.deploy_harness import REPO, Federation, flower_available, read, write_node_data
from tests.test_own_model import USER_MODULE

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not flower_available(), reason="Flower binaries not next to this interpreter, or no /proc"),
]

MODEL = "hospital_models.nets:build_model"


def _user_package(root: Path) -> Path:
    package = root / "hospital_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    return root


def test_real_nodes_train_a_users_model_and_a_node_without_its_code_refuses(tmp_path: Path) -> None:
    installed = _user_package(tmp_path / "site")
    with_package = os.pathsep.join([str(installed), str(REPO)])
    with Federation(tmp_path / "fed", env={"PYTHONPATH": with_package}) as fed:
        data = write_node_data(fed.root / "data", 3)
        fed.start_superlink()  # the coordinator has the user's code: it builds and evaluates the model
        for name in ("a", "b", "c"):
            fed.register(name)
        for i, name in enumerate(("a", "b")):
            fed.start_node(name, data[i], extra=["--allow-models", "hospital_models"])
        fed.env = {**fed.env, "PYTHONPATH": str(REPO)}  # node c's operator never installed hospital_models
        fed.start_node("c", data[2], extra=["--allow-models", "hospital_models"])
        for name in ("a", "b", "c"):
            fed.wait_connected(name)
            fed.wait_warm(name)

        out = fed.root / "run"
        status, output = fed.run({"model": MODEL, "num-rounds": 2, "local-epochs": 1, "min-nodes": 3, "seed": 7,
                                  "out-dir": str(out)}, timeout=300)
        assert status == 0, output[-4000:]

        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        trained = {str(fed.node_ids["a"]), str(fed.node_ids["b"])}
        for r in rounds[1:]:
            assert r["aggregated"] and r["replies"] == 2, r
            assert set(r["node_epsilon"]) == trained, r["node_epsilon"]
            assert [p["code"] for p in r["problems"] if p["node"] == fed.node_ids["c"]] == [MODEL_UNAVAILABLE], r
            assert any(p.get("node_name") == "c" for p in r["problems"]), r["problems"]
        assert 0 < rounds[-1]["epsilon_max"] <= 3.0
        first, last = rounds[0]["eval"], rounds[-1]["eval"]
        assert last["accuracy"] >= 0.85 and last["loss"] < first["loss"], (first, last)
        # c's operator reads why, in c's own output; nothing of it reached the coordinator as a traceback.
        assert "module 'hospital_models' is not installed here" in read(fed.logs["c"])
        assert "Traceback" not in output
        assert not list((fed.root / "ledgers" / "c").glob("*.json"))  # c spent nothing
        assert "Traceback" not in read(fed.logs["a"])
