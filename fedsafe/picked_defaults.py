"""The training settings fedsafe picks for a run's privacy budget, where the user set none (issue 12 item 1).

The user asks for ε; fedsafe picks the rounds, local epochs, batch size, learning rate and its schedule
unless told (a setting the user gives always wins; `fedsafe simulate` prints what it picked and why).
Chosen by measurement (benchmarks/defaults_sweep.py; README, "Utility at strict privacy"): under local DP
each node's update carries its own full noise, and at a fixed ε the signal-to-noise ratio of a node's
steps barely moves with the batch or the rounds (σ grows as they do). What helped: full-batch rounds of
one epoch (batch 256: q = 1 on a node of up to 256 records), few of them, and for the CNN a larger lr
decaying to 0 (cosine), so that the last rounds take small steps instead of jumping with the noise.

The accounting is unaffected: the node calibrates σ for the rounds, batch and epochs it is sent, as for
any user's settings, and its ledger charges exactly what ran. Below the budget where the recipe's rounds
fit, the rounds shrink with ε² so that σ stays near 18 at q = 1, under a node's default
max-noise-multiplier (20): more rounds would be refused by the nodes as noise.

This module imports nothing of fedsafe's: the coordinator (RunConfig) and the node's own defaults
(client/training.py) both read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Each recipe: values by Python name, and why (printed when a run starts with any of them picked).
# The rounds set by the user: the per-round settings fedsafe had before it picked by budget.
FIXED_ROUNDS = {"local_epochs": 3, "batch_size": 32, "lr": 0.5, "lr_schedule": "constant"}
# No DP: those per-round settings, over 5 rounds.
NO_DP = {"num_rounds": 5, **FIXED_ROUNDS}
NO_DP_WHY = "no DP: several local epochs per round cost nothing"
# Distributed DP runs one DP-SGD step per round (local-steps 1): the recipe benchmarks/utility.py measured.
DISTRIBUTED_DP = {"num_rounds": 60, "local_epochs": 1, "batch_size": 32, "lr": 2.0, "lr_schedule": "constant"}
DISTRIBUTED_DP_WHY = ("distributed DP: one DP-SGD step per round, the sum carrying one σ; many small-batch rounds "
                      "(measured: digits CNN ε=3 0.887)")
# Local DP, by model family: full-batch rounds of one epoch (batch 256: q = 1 on a node of up to 256 records).
# The CNN on images took a larger lr decaying to 0 over more rounds; the MLP on tabular data fewer rounds at a
# constant lr (benchmarks/defaults_sweep.py; README, "Utility at strict privacy").
LOCAL_DP = {
    "cnn": ({"local_epochs": 1, "batch_size": 256, "lr": 3.0, "lr_schedule": "cosine"}, 60,
            "local DP, cnn: 60 full-batch rounds of one epoch, lr 3 decaying to 0 (cosine)"),
    "": ({"local_epochs": 1, "batch_size": 256, "lr": 1.0, "lr_schedule": "constant"}, 20,
         "local DP: 20 full-batch rounds of one epoch at lr 1"),
}
# Below ε = 2 the other families' lr halves: σ is larger, and smaller steps average more of it. Breast-cancer
# MLP, five seeds (1, 7, 13, 42, 99), mean accuracy at lr 0.5 vs 1: ε=1 0.902 vs 0.854, ε=2 0.917 vs 0.915,
# ε=3 0.919 vs 0.929 (benchmarks/defaults_sweep.py). The CNN's lr was not measured by budget: kept.
SMALL_BUDGET_EPSILON, SMALL_BUDGET_LR = 2.0, 0.5
# σ at q = 1 grows with √rounds / ε: at most 20·ε² rounds keeps it near 18, under the nodes' default
# max-noise-multiplier (20), where nodes would refuse the run as noise.
ROUNDS_PER_EPSILON_SQUARED = 20

FIXED_ROUNDS_WHY = ("num-rounds set, so not the budget's recipe, whose per-round settings were measured with its own "
                    "rounds: leave --rounds out for them")

PICKABLE = ("num_rounds", "local_epochs", "batch_size", "lr", "lr_schedule")


@dataclass(frozen=True)
class Picks:
    values: dict[str, Any]  # by Python name: only the settings the run left to fedsafe
    why: str

    def line(self) -> str:
        """One line for the operator: what was picked and why, and how to override it."""
        shown = ", ".join(f"{name.replace('_', '-')} {value}" for name, value in self.values.items())
        return f"fedsafe: picked {shown} ({self.why}); set any of them to override"


def recipe(dp: bool, epsilon: float, distributed_dp: bool, model: str = "") -> tuple[dict[str, Any], str]:
    """Every pickable setting's value for a run with these privacy settings and model family, and why."""
    if not dp:
        return dict(NO_DP), NO_DP_WHY
    if distributed_dp:
        return dict(DISTRIBUTED_DP), DISTRIBUTED_DP_WHY
    values, most_rounds, why = LOCAL_DP.get(model, LOCAL_DP[""])
    if model not in LOCAL_DP and 0 < epsilon < SMALL_BUDGET_EPSILON:
        values = {**values, "lr": SMALL_BUDGET_LR}
        why += f"; lr {SMALL_BUDGET_LR:g} below ε={SMALL_BUDGET_EPSILON:g}"
    # (an ε out of bounds is refused by RunConfig's checks, after this)
    rounds = most_rounds if not 0 < epsilon < math.inf else max(1, min(most_rounds, round(
        ROUNDS_PER_EPSILON_SQUARED * epsilon ** 2)))
    if rounds < most_rounds:
        why += f"; {rounds} rounds, not {most_rounds}, at ε={epsilon:g}: σ stays under the nodes' max-noise-multiplier"
    return {"num_rounds": rounds, **values}, why


def pick(values: Mapping[str, Any], unset: set[str]) -> Picks:
    """The picks for the settings named in `unset` (Python names), given the run's other `values`.

    A recipe is measured whole, its rounds with its per-round work: when the user fixed the rounds, the
    other unset settings take the per-round values fedsafe had before it picked by budget (FIXED_ROUNDS)."""
    if "num_rounds" in unset:
        chosen, why = recipe(bool(values["dp"]), float(values["epsilon"]), bool(values["distributed_dp"]),
                             str(values["model"]))
    else:
        chosen, why = dict(FIXED_ROUNDS), FIXED_ROUNDS_WHY
    return Picks({name: chosen[name] for name in PICKABLE if name in unset}, why)
