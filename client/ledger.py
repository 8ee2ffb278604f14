"""The node's privacy ledger: every DP-SGD step ever taken on one dataset, on the node's own disk.

One JSON file per protected dataset under the operator's state directory. Its `accountant` entry is an
Opacus accountant `state_dict` (mechanism and history), so ε can be recomputed by Opacus from the file
alone; `rounds` says which run and round each history entry belongs to. A round's spend is written
(reserved) *before* training starts, so a crash at any point can only over-count, never under-count.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accounting import CalibrationError, Spend, calibrate_noise, epsilon
from .files import atomic_write

LEDGER_VERSION = 1


class BudgetExhausted(RuntimeError):
    """The round asked for would take the node past its privacy budget."""


class NoiseTooHigh(RuntimeError):
    """The run's σ is above the node's max-noise-multiplier: its updates would be noise."""


class LedgerError(RuntimeError):
    """The ledger file cannot be trusted (corrupt, or written by another version)."""


@dataclass(frozen=True)
class RunPlan:
    """The DP parameters of one run on this node, fixed on its first round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float


def ledger_filename(data_key: str) -> str:
    """A file name safe on every OS, readable, and unique for `data_key`."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", data_key)[:80]
    digest = hashlib.sha256(data_key.encode()).hexdigest()[:12]
    return f"{readable}-{digest}.json"


class PrivacyLedger:
    def __init__(self, path: Path, data_key: str, state: dict[str, Any] | None = None) -> None:
        self.path = path
        self.data_key = data_key
        self._state = state or {
            "version": LEDGER_VERSION,
            "data_key": data_key,
            "accountant": {"mechanism": "rdp", "history": []},
            "rounds": [],
            "runs": {},
        }

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | Path, data_key: str) -> PrivacyLedger:
        """Load the ledger of `data_key` from `state_dir`, or start an empty one."""
        state_dir = Path(state_dir).expanduser()
        path = state_dir / ledger_filename(data_key)
        if not path.exists():
            return cls(path, data_key)
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({err}); refusing to train rather than "
                "forget past spend — restore it from backup"
            ) from None
        if state.get("version") != LEDGER_VERSION or state.get("data_key") != data_key:
            raise LedgerError(
                f"privacy ledger {path} has version {state.get('version')!r} and key "
                f"{state.get('data_key')!r}; expected version {LEDGER_VERSION} and key {data_key!r}"
            )
        return cls(path, data_key, state)

    @contextlib.contextmanager
    def _transaction(self):
        """Read-modify-write under an exclusive lock, so two processes on one dataset cannot
        both spend what only one of them may."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._state = PrivacyLedger.open(self.path.parent, self.data_key)._state
            yield
            self._save()

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._state))

    def _save(self) -> None:
        """Write atomically and durably: a crash leaves the old file or the new one, never half."""
        with atomic_write(self.path) as handle:
            json.dump(self._state, handle, indent=1)

    # ---- reading -----------------------------------------------------------------------------
    @property
    def history(self) -> list[Spend]:
        return [(float(s), float(q), int(n)) for s, q, n in self._state["accountant"]["history"]]

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history, delta, accountant)

    def run_plan(self, run_id: str) -> RunPlan | None:
        plan = self._state["runs"].get(run_id)
        return RunPlan(**plan) if plan else None

    def rounds_of(self, run_id: str) -> list[dict[str, Any]]:
        return [r for r in self._state["rounds"] if r["run"] == run_id]

    def project(self, run_id: str, spend: Spend, delta: float, accountant: str = "rdp") -> tuple[float, float]:
        """(ε of all spend on this data, ε of this run's spend) if one more `spend` were taken; changes nothing."""
        history = self.history
        run_spend = [history[r["entry"]] for r in self.rounds_of(run_id)]
        return epsilon([*history, spend], delta, accountant), epsilon([*run_spend, spend], delta, accountant)

    # ---- spending ----------------------------------------------------------------------------
    def plan_run(
        self,
        run_id: str,
        *,
        sample_rate: float,
        steps_per_round: int,
        planned_rounds: int,
        run_epsilon: float,
        max_epsilon: float,
        delta: float,
        accountant: str = "rdp",
        max_noise_multiplier: float = math.inf,
    ) -> RunPlan:
        """Fix σ for a run, once: the run alone stays within `run_epsilon`, and everything this
        dataset has ever spent, this run included, within `max_epsilon`. NoiseTooHigh, leaving the
        ledger untouched, where that σ is above `max_noise_multiplier` (checked on every round: the
        operator may have lowered the bound since the run began)."""
        with self._transaction():
            existing = self.run_plan(run_id)
            if existing is not None:
                _check_noise(existing.noise_multiplier, max_noise_multiplier)
                return existing
            steps = steps_per_round * planned_rounds
            try:
                sigma_run = calibrate_noise([], sample_rate, steps, run_epsilon, delta, accountant)
            except CalibrationError:
                # No σ the accountant tries meets so small a grant: it would need more noise than any bound.
                _check_noise(math.inf, max_noise_multiplier)
                raise
            if epsilon([*self.history, (sigma_run, sample_rate, steps)], delta, accountant) <= max_epsilon:
                # σ_run already keeps the lifetime cap, so the cap's own (smaller) σ cannot be the larger:
                # skip its calibration (seconds of RDP evaluations, in every fresh ClientApp process).
                sigma_cap = sigma_run
            else:
                try:
                    sigma_cap = calibrate_noise(
                        self.history, sample_rate, steps, max_epsilon, delta, accountant
                    )
                except ValueError as err:
                    raise BudgetExhausted(
                        f"privacy budget exhausted: node cap ε={max_epsilon:g} cannot fund this run ({err})"
                    ) from None
            _check_noise(max(sigma_run, sigma_cap), max_noise_multiplier)
            plan = RunPlan(
                noise_multiplier=max(sigma_run, sigma_cap),
                sample_rate=sample_rate,
                steps_per_round=steps_per_round,
                planned_rounds=planned_rounds,
                target_epsilon=min(run_epsilon, max_epsilon),
            )
            self._state["runs"][run_id] = plan.__dict__.copy()
        return plan

    def reserve(
        self,
        run_id: str,
        server_round: int,
        spend: Spend,
        *,
        max_epsilon: float,
        delta: float,
        run_epsilon: float | None = None,
        accountant: str = "rdp",
    ) -> float:
        """Record a round's spend before it is taken; refuse it if a budget would be exceeded: the
        node's lifetime cap over all spend on this data, and the run's own ε over this run's spend.

        A round asked for twice (a coordinator resumed after a crash) is charged twice: it is trained
        twice. Returns ε after the round. Raises BudgetExhausted, leaving the ledger untouched, otherwise.
        """
        with self._transaction():
            return self._reserve(run_id, server_round, spend, max_epsilon, run_epsilon, delta, accountant)

    def _reserve(
        self, run_id: str, server_round: int, spend: Spend, max_epsilon: float,
        run_epsilon: float | None, delta: float, accountant: str,
    ) -> float:
        if run_epsilon is not None:
            history = self.history
            run_spend = [history[r["entry"]] for r in self.rounds_of(run_id)]
            run_after = epsilon([*run_spend, spend], delta, accountant)
            if run_after > run_epsilon + 1e-9:
                raise BudgetExhausted(
                    f"privacy budget exhausted: round {server_round} would take run {run_id} to "
                    f"ε={run_after:.3f}, over the ε={run_epsilon:g} it was granted (δ={delta:g})"
                )
        after = epsilon([*self.history, spend], delta, accountant)
        # 1e-9: bisection and accountant arithmetic agree to far better than this.
        if after > max_epsilon + 1e-9:
            spent = self.epsilon(delta, accountant)
            raise BudgetExhausted(
                f"privacy budget exhausted: this round would raise ε from {spent:.3f} to {after:.3f}, "
                f"over the node's cap ε={max_epsilon:g} (δ={delta:g}) for data {self.data_key!r}"
            )
        self._state["accountant"]["history"].append(list(spend))
        self._state["rounds"].append(
            {
                "run": run_id,
                "round": server_round,
                "entry": len(self._state["accountant"]["history"]) - 1,
                "status": "reserved",
                "time": time.time(),
            }
        )
        return after

    def settle(self, run_id: str, server_round: int, steps_taken: int) -> None:
        """Replace a reservation by the steps really taken (never more than reserved)."""
        with self._transaction():
            self._settle(run_id, server_round, steps_taken)

    def _settle(self, run_id: str, server_round: int, steps_taken: int) -> None:
        for record in reversed(self.rounds_of(run_id)):
            if record["round"] == server_round and record["status"] == "reserved":
                entry = self._state["accountant"]["history"][record["entry"]]
                if steps_taken > entry[2]:
                    raise LedgerError(
                        f"round {server_round} took {steps_taken} steps but reserved only {entry[2]}"
                    )
                entry[2] = int(steps_taken)
                record["status"] = "spent"
                return
        raise LedgerError(f"no reservation for round {server_round} of run {run_id}")


def _check_noise(noise_multiplier: float, bound: float) -> None:
    """Raise NoiseTooHigh (inside a transaction: nothing is written) where σ is above the node's bound."""
    if noise_multiplier > bound:
        needed = f"σ={noise_multiplier:.3g}" if math.isfinite(noise_multiplier) else "σ beyond any the accountant tries"
        raise NoiseTooHigh(
            f"the run's grant needs noise multiplier {needed}, above this node's max-noise-multiplier="
            f"{bound:g}: its updates would be noise (grant the run more ε, or plan fewer rounds)"
        )
