"""A minority of simulated attackers: robust aggregators keep the model where FedAvg collapses."""

import pytest

from fed_harness import federation, run

NODES, ATTACKERS = 7, 2  # Krum with f = 2 needs n >= 2f + 3 = 7


def _final_accuracy(tmp_path, strategy, attack="sign-flip", attackers=ATTACKERS, **params):
    cfg, grid, chain = federation(tmp_path / f"{strategy}-{attack}-{attackers}", nodes=NODES, strategy=strategy,
                                  dp=False, attack=attack, attackers=attackers, factor=5.0, **params)
    return run(cfg, grid, chain).history[-1]["eval"]["accuracy"]


def test_attack_is_simulation_only():
    import fedsafe.client.app

    mods = fedsafe.client.app.app._mods
    assert all("attack" not in getattr(m, "__qualname__", "").lower() for m in mods)


def test_fedavg_collapses_under_sign_flipping_nodes(tmp_path):
    assert _final_accuracy(tmp_path, "fedavg", attack="none", attackers=0) >= 0.9
    assert _final_accuracy(tmp_path, "fedavg") < 0.5


@pytest.mark.parametrize("strategy,params", [
    ("krum", {"num_malicious": ATTACKERS}),
    ("fedmedian", {}),
    ("fedtrimmedavg", {"trim_beta": 0.3}),
])
def test_robust_aggregators_keep_accuracy_under_attack(tmp_path, strategy, params):
    assert _final_accuracy(tmp_path, strategy, **params) >= 0.88
    assert _final_accuracy(tmp_path, strategy, attack="scale", **params) >= 0.88
