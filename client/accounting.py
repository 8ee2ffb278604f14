"""Privacy accounting math: ε of a spend history, and noise calibration against it.

A spend history is Opacus' own: a list of (noise multiplier σ, sample rate q, steps). The math is
Opacus' accountants; this module only composes histories and searches σ.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence

Spend = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE_MULTIPLIER = 1e4

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """No noise multiplier keeps the history within the target ε."""


def epsilon(history: Sequence[Spend], delta: float, accountant: str = "rdp") -> float:
    """ε after every spend in `history`, at `delta`, composed by an Opacus accountant.

    PRV accounting can fail on some histories ("Discrete mean differs"); RDP, an upper bound, is then used.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
    spends = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not spends:
        return 0.0
    from opacus.accountants import create_accountant

    if accountant == "prv":
        try:
            acc = create_accountant("prv")
            acc.history = list(spends)
            return float(acc.get_epsilon(delta))
        except Exception as err:  # noqa: BLE001 - any PRV failure falls back to the RDP bound
            log.warning("PRV accounting failed (%s); reporting the RDP bound instead", err)
    return _rdp_epsilon(spends, delta)


def _rdp_epsilon(spends: Sequence[Spend], delta: float) -> float:
    """What Opacus' RDPAccountant.get_epsilon computes, with each (σ, q) pair's RDP curve cached:
    RDP composes by addition, so a history costs one curve per distinct (σ, q), scaled by its steps."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in spends)
    with warnings.catch_warnings():
        # Opacus warns when the optimal RDP order sits at the edge of its grid (σ far from 1):
        # the bound is still valid, only looser.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=_rdp_orders(), rdp=total, delta=delta)
    return float(eps)


@functools.cache
def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float):
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_rdp_orders()))


def calibrate_noise(
    prior: Sequence[Spend],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 0.005,
) -> float:
    """The smallest σ (within `tolerance` in ε) such that `prior` plus `steps` at (σ, q) stays ≤ target.

    Calibrating over all the steps a run will take — rounds × epochs × the Poisson loader's batches —
    once, is what keeps the last round's ε at or under the target. Cached: the many virtual nodes of a
    simulation mostly share a partition size, hence the same answer.
    """
    return _calibrate(tuple(map(tuple, prior)), float(sample_rate), int(steps), float(target_epsilon),
                      float(delta), accountant, tolerance)


@functools.lru_cache(maxsize=1024)
def _calibrate(
    prior: tuple[Spend, ...],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 0.005,
) -> float:
    if not target_epsilon > 0:
        raise CalibrationError(f"target ε must be > 0; got {target_epsilon}")

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    if eps_at(MAX_NOISE_MULTIPLIER) > target_epsilon:
        spent = epsilon(prior, delta, accountant)
        raise CalibrationError(
            f"ε target {target_epsilon:g} cannot be met for {steps} more steps: "
            f"{spent:.3f} already spent at δ={delta:g}"
        )
    # Bisection in log space; invariant: eps_at(high) <= target < eps_at(low).
    low, high = 0.1, MAX_NOISE_MULTIPLIER
    if eps_at(low) <= target_epsilon:
        return low
    for _ in range(60):
        mid = math.sqrt(low * high)
        eps = eps_at(mid)
        if eps <= target_epsilon:
            high = mid
            if target_epsilon - eps <= tolerance:
                break
        else:
            low = mid
    return high
