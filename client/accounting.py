"""Privacy accounting math: ε of a spend history, and noise calibration against it.

A spend history is Opacus' own: a list of (noise multiplier σ, sample rate q, steps). The math is
Opacus' accountants; this module only composes histories and searches σ.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write

Spend = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

ACCOUNTANTS = ("rdp", "prv")
# The two ε of a distributed-DP release (a node adding σ/√m of the noise, SecAgg+ summing m or more):
OWN_UPDATE = "own-update"  # against anyone who sees the node's update alone (SecAgg+ failed): σ/√m
AGGREGATE = "aggregate"  # against a server that sees only the sum (SecAgg+ held, >= m honest survivors): σ
CAP_BASES = (OWN_UPDATE, AGGREGATE)
MAX_NOISE_MULTIPLIER = 1e4

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """No noise multiplier keeps the history within the target ε."""


def check_spend(spend, min_steps: int = 0) -> Spend:
    """`spend` as a (σ, q, steps) tuple, or ValueError saying what is wrong with it.

    Every figure the accountant composes passes here: a NaN σ would send the RDP math into an endless
    search, and a negative step count would cancel earlier spend (or read as ε = 0)."""
    if isinstance(spend, (str, bytes)) or not hasattr(spend, "__len__") or len(spend) != 3:
        raise ValueError(f"a spend is [noise multiplier, sample rate, steps]; got {spend!r}")
    sigma, rate, steps = spend
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) \
            or not 0 < sigma <= MAX_NOISE_MULTIPLIER:
        raise ValueError(f"noise multiplier {sigma!r} is not a number in (0, {MAX_NOISE_MULTIPLIER:g}]")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or not 0 < rate <= 1:
        raise ValueError(f"sample rate {rate!r} is not a number in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < min_steps:
        raise ValueError(f"step count {steps!r} is not a whole number >= {min_steps}")
    return float(sigma), float(rate), int(steps)


def aggregate_spend(spend: Spend, noise_shares: int) -> Spend:
    """A node's own (σ/√m, q, steps) as the sum of `noise_shares` = m such releases sees it: (σ, q, steps).

    Exact for one DP-SGD step per round (DP-FedSGD) when the server learns only the sum: each node's
    noisy clipped-gradient sum carries N(0, (σ/√m)²C²) independently, so m of them carry N(0, σ²C²)
    around a sum in which one record moves at most C: a DP-SGD step at σ over the union of the batches,
    whose Poisson sampling of each record is its own node's, at rate q."""
    sigma, rate, steps = spend
    return (sigma * math.sqrt(noise_shares), rate, steps) if noise_shares != 1 else spend


def epsilon(history: Sequence[Spend], delta: float, accountant: str = "rdp") -> float:
    """ε after every spend in `history`, at `delta`, composed by an Opacus accountant.

    PRV accounting can fail on some histories ("Discrete mean differs"); RDP, an upper bound, is then used.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
    spends = [spend for spend in map(check_spend, history) if spend[2] > 0]
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


# ---- an optional disk cache: a node's ClientApp is a fresh process every round ----------------------------
# Both cached functions are pure: the RDP curve of one DP-SGD step at (σ, q) over Opacus' orders, and the σ
# calibrated for a run with no prior spend. Floats are stored as JSON (repr: exact), keyed by repr.
_disk: dict | None = None
_disk_path: Path | None = None
_calibrating = 0  # curves evaluated while searching σ are not worth keeping


def use_disk_cache(path: str | Path | None) -> None:
    """Keep RDP curves and calibrations in the JSON file `path` (None: memory only)."""
    global _disk, _disk_path
    _disk_path = Path(path).expanduser() if path is not None else None
    _disk = None
    if _disk_path is None:
        return
    try:
        loaded = json.loads(_disk_path.read_text())
        if loaded.get("orders") == list(_rdp_orders()):
            _disk = loaded
    except (OSError, ValueError, AttributeError):
        pass
    if _disk is None:
        _disk = {"orders": list(_rdp_orders()), "rdp": {}, "calibration": {}}


def _disk_get(section: str, key: str):
    return None if _disk is None else _disk[section].get(key)


def _disk_put(section: str, key: str, value) -> None:
    if _disk is None or _disk_path is None:
        return
    _disk[section][key] = value
    try:
        with atomic_write(_disk_path, durable=False) as handle:
            json.dump(_disk, handle)
    except OSError as err:  # a cache: never fatal
        log.warning("accounting cache %s not written: %s", _disk_path, err)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float):
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    key = f"{noise_multiplier!r}|{sample_rate!r}"
    if (cached := _disk_get("rdp", key)) is not None:
        return np.asarray(cached, dtype=float)
    curve = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_rdp_orders()))
    if not _calibrating:
        _disk_put("rdp", key, np.asarray(curve, dtype=float).tolist())
    return curve


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
    key = f"{sample_rate!r}|{steps}|{target_epsilon!r}|{delta!r}|{accountant}|{tolerance!r}"
    if not prior and (cached := _disk_get("calibration", key)) is not None:
        return float(cached)
    global _calibrating
    _calibrating += 1
    try:
        sigma = _bisect(prior, sample_rate, steps, target_epsilon, delta, accountant, tolerance)
    finally:
        _calibrating -= 1
    if not prior:
        _disk_put("calibration", key, sigma)
    if accountant == "rdp" and _disk_get("rdp", f"{sigma!r}|{sample_rate!r}") is None:
        import numpy as np

        _disk_put("rdp", f"{sigma!r}|{sample_rate!r}", np.asarray(_rdp_per_step(sigma, sample_rate), dtype=float).tolist())
    return sigma


def _bisect(prior, sample_rate, steps, target_epsilon, delta, accountant, tolerance) -> float:
    def eps_at(sigma: float) -> float:
        if accountant == "rdp" and steps > 0:
            return _rdp_epsilon_with(prior, (sigma, sample_rate, steps), delta)
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


ORDERS_PER_PASS = 8
RDP_FLOOR = -1e-6  # RDP is >= 0; room for rounding in Opacus' series (orders of magnitude more than it needs)


def _rdp_epsilon_with(prior: Sequence[Spend], spend: Spend, delta: float) -> float:
    """`epsilon([*prior, spend], delta, "rdp")`, the same float, with `spend`'s RDP curve computed only at
    the orders that can hold the minimum: what the σ search evaluates for each σ it tries, once.

    Opacus' ε is the minimum over its orders α of rdp(α) - A(α) + B(α), where A and B depend on α and δ
    alone and rdp(α) >= 0. An order whose B(α) - A(α) already exceeds a value found at another order
    cannot hold the minimum; those are the small fractional orders (α < 4 for ε ≈ 3 at δ = 1e-5), whose
    series are the slow part of an RDP curve (~80% of its time). Orders are computed from the smallest
    B - A up, until every order left is ruled out; every figure is computed as Opacus computes it, on
    arrays of all the orders, so the minimum is the same float."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    sigma, rate, steps = check_spend(spend)
    orders = np.atleast_1d(list(_rdp_orders()))
    # As opacus.accountants.analysis.rdp.get_privacy_spent writes them, over the same array:
    shift, gain = (np.log(delta) + np.log(orders)) / (orders - 1), np.log((orders - 1) / orders)
    floor = (RDP_FLOOR - shift) + gain  # the least each order's value can be (any prior spend only adds)
    prior_rdp = sum(n * _rdp_per_step(s, q) for s, q, n in (check_spend(p) for p in prior) if n > 0)
    curve = np.full(len(orders), np.inf)
    best = np.inf
    pending = list(np.argsort(floor, kind="stable"))
    while pending and floor[pending[0]] <= best:
        batch, pending = pending[:ORDERS_PER_PASS], pending[ORDERS_PER_PASS:]
        curve[batch] = compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=[float(orders[i]) for i in batch])
        values = ((prior_rdp + steps * curve) - shift) + gain
        if not np.isnan(values).all():
            best = float(np.nanmin(values))
    if math.isinf(best) or math.isnan(best):  # nothing finite: let Opacus say what ε is
        return epsilon([*prior, spend], delta, "rdp")
    return best
