"""The node's privacy ledger: every DP-SGD step ever taken on one dataset, on the node's own disk.

One JSON file per protected dataset under the operator's state directory, holding an append-only log of
entries — a run's plan (σ, q, steps per round), each round's reservation (written *before* training, so
a crash can only over-count) and its settlement (what the optimizer really did) — each entry chained to
the one before by its SHA-256. The file also holds views derived from the log: `accountant`, an Opacus
accountant `state_dict` (ε can be recomputed by Opacus from the file alone), `rounds` and `runs`.

Nothing in the file is trusted on its own. Opening it re-derives the views from the log and refuses the
file (LedgerError, naming it and what is wrong) when the chain is broken, an entry is out of range or
disagrees with its run's plan, or a stored view differs from what the log says. The chain's first link
binds the file to this state directory's node identity (fedsafe.client.identity), which also remembers
every data key ever trained: a deleted ledger is noticed, not silently restarted at zero.

What this stops: hand edits (steps set to 0, history emptied, σ raised), corruption, truncation in the
middle, a ledger copied from another node or key, a deleted ledger. What it cannot stop: someone who
rewrites the whole chain with this code, or deletes the state directory with its identity file; there is
no secret on the node that the operator could not read (README, "The node operator's side").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .accounting import AGGREGATE, OWN_UPDATE, CalibrationError, Spend, aggregate_spend, calibrate_noise, check_spend, epsilon
from .files import atomic_write
from .identity import NodeIdentity

LEDGER_VERSION = 2


class BudgetExhausted(RuntimeError):
    """The round asked for would take the node past its privacy budget."""


class NoiseTooHigh(RuntimeError):
    """The run's σ is above the node's max-noise-multiplier: its updates would be noise."""


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (damaged, edited, missing, written by another version) or refuses
    an entry that would make it inconsistent."""


class SettlementMismatch(LedgerError):
    """Training did not do what the round reserved (another σ, sample rate or step count)."""


@dataclass(frozen=True)
class RunPlan:
    """The DP parameters of one run on this node, fixed on its first round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    # Distributed DP (SecAgg+): m, the fewest nodes whose noise the released sum carries. The node adds
    # noise_multiplier = σ/√m, its share of the aggregate's σ; 1 (local DP): the node adds all of σ.
    noise_shares: int = 1

    def check(self) -> RunPlan:
        """This plan, or ValueError naming the figure out of range."""
        check_spend((self.noise_multiplier, self.sample_rate, self.steps_per_round), min_steps=1)
        check_noise_shares(self.noise_shares)
        if isinstance(self.planned_rounds, bool) or not isinstance(self.planned_rounds, int) or self.planned_rounds < 1:
            raise ValueError(f"planned rounds {self.planned_rounds!r} is not a whole number >= 1")
        if isinstance(self.target_epsilon, bool) or not isinstance(self.target_epsilon, (int, float)) \
                or not math.isfinite(self.target_epsilon) or not self.target_epsilon > 0:
            raise ValueError(f"target ε {self.target_epsilon!r} is not a number > 0")
        return self

    def round_spend(self) -> Spend:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def aggregate_noise_multiplier(self) -> float:
        """σ of the sum the server sees when m nodes each add σ/√m (= noise_multiplier under local DP)."""
        return aggregate_spend(self.round_spend(), self.noise_shares)[0]

    def record(self) -> dict[str, Any]:
        """The plan's fields as the ledger stores them: noise_shares only where distributed (m > 1), so
        that ledgers of local-DP runs read exactly as before it existed."""
        fields = asdict(self)
        if self.noise_shares == 1:
            del fields["noise_shares"]
        return fields


def check_noise_shares(shares: Any) -> int:
    """`shares` (m of distributed DP), or ValueError."""
    if isinstance(shares, bool) or not isinstance(shares, int) or shares < 1:
        raise ValueError(f"noise shares {shares!r} is not a whole number >= 1")
    return shares


def ledger_filename(data_key: str) -> str:
    """A file name safe on every OS, readable, and unique for `data_key`."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", data_key)[:80]
    digest = hashlib.sha256(data_key.encode()).hexdigest()[:12]
    return f"{readable}-{digest}.json"


# ---- the entry log --------------------------------------------------------------------------------------
def _canonical(value: Any) -> bytes:
    """The bytes an entry's hash covers: key order fixed, floats as Python writes them (round-trip exact)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def genesis(node_id: str, data_key: str) -> str:
    """The `prev` of a ledger's first entry: the chain belongs to this node's state directory and this key."""
    return hashlib.sha256(_canonical(["fedsafe-ledger", LEDGER_VERSION, node_id, data_key])).hexdigest()


def _same_spend(a: Spend, b: Spend) -> bool:
    return a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-12, abs_tol=0.0) and a[2] == b[2]


@dataclass
class _Views:
    """What the entry log says: the accountant history, the rounds and the run plans."""

    history: list[list]
    rounds: list[dict[str, Any]]
    runs: dict[str, dict[str, Any]]

    def as_state(self) -> dict[str, Any]:
        return {"accountant": {"mechanism": "rdp", "history": self.history}, "rounds": self.rounds, "runs": self.runs}


def _derive(entries: list[dict[str, Any]]) -> tuple[_Views, list[str]]:
    """Replay the log: the views it implies, and one line per entry that is out of range or disagrees
    with its run's plan or reservation."""
    views, problems = _Views([], [], {}), []
    for index, entry in enumerate(entries):
        try:
            _apply(views, entry)
        except (ValueError, TypeError, KeyError) as err:
            detail = f"lacks field {err}" if isinstance(err, KeyError) else str(err)
            problems.append(f"entry {index} ({entry.get('kind', '?') if isinstance(entry, dict) else '?'}): {detail}")
    return views, problems


def _apply(views: _Views, entry: dict[str, Any]) -> None:
    """Add one entry to `views`; ValueError (or KeyError, TypeError) if it is out of range or inconsistent."""
    run = entry["run"]
    if not isinstance(run, str):
        raise ValueError(f"run {run!r} is not a string")
    apply = {"plan": _apply_plan, "reserve": _apply_reserve, "settle": _apply_settle}.get(entry["kind"])
    if apply is None:
        raise ValueError(f"unknown kind {entry['kind']!r}")
    if entry["kind"] != "plan":
        server_round = entry["round"]
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
            raise ValueError(f"round {server_round!r} is not a whole number >= 1")
    apply(views, entry, run)


def _apply_plan(views: _Views, entry: dict[str, Any], run: str) -> None:
    if run in views.runs:
        raise ValueError(f"run {run} is planned twice")
    fields = {f: entry[f] for f in RunPlan.__dataclass_fields__ if f != "noise_shares"}
    if "noise_shares" in entry:
        fields["noise_shares"] = entry["noise_shares"]
    views.runs[run] = RunPlan(**fields).check().record()


def _apply_reserve(views: _Views, entry: dict[str, Any], run: str) -> None:
    spend = check_spend(entry["spend"], min_steps=1)
    shares = check_noise_shares(entry.get("noise_shares", 1))
    if run in views.runs:
        plan = RunPlan(**views.runs[run])
        planned = plan.round_spend()
        if not _same_spend(spend, planned):
            raise ValueError(f"reserves {list(spend)}, not the [σ, q, steps] {list(planned)} of run {run}'s plan")
        if shares != plan.noise_shares:
            raise ValueError(f"reserves with noise shared by {shares} nodes, not the {plan.noise_shares} of "
                             f"run {run}'s plan")
    views.history.append(list(spend))
    views.rounds.append({"run": run, "round": entry["round"], "entry": len(views.history) - 1,
                         "status": "reserved", "time": entry["time"]})


def _apply_settle(views: _Views, entry: dict[str, Any], run: str) -> None:
    server_round = entry["round"]
    record = next((r for r in reversed(views.rounds)
                   if (r["run"], r["round"], r["status"]) == (run, server_round, "reserved")), None)
    if record is None:
        raise ValueError(f"settles round {server_round} of run {run}, which has no open reservation")
    actual = [check_spend(s) for s in entry["actual"]]
    reserved = tuple(views.history[record["entry"]])
    if entry["outcome"] == "spent":
        if not (len(actual) == 1 and _same_spend(actual[0], reserved)):
            raise ValueError(f"marks as spent a round whose training did {actual}, not the reserved {list(reserved)}")
        record["status"] = "spent"
    elif entry["outcome"] == "withheld":
        record["status"] = "withheld"  # the update never left the node; the reservation stays charged
    else:
        raise ValueError(f"unknown outcome {entry['outcome']!r}")


def _check_chain(entries: list, first_prev: str) -> list[str]:
    problems, prev = [], first_prev
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"entry {index} is not an object")
            return problems
        if entry.get("prev") != prev:
            which = "the node identity and data key" if index == 0 else f"entry {index - 1}"
            problems.append(f"hash chain broken at entry {index}: it does not follow {which}")
            return problems
        try:
            actual = entry_hash(entry)
        except ValueError:  # NaN or infinity in the entry: json refuses to hash it
            actual = None
        if entry.get("hash") != actual:
            problems.append(f"hash chain broken at entry {index}: its content does not match its hash (edited)")
            return problems
        prev = entry["hash"]
    return problems


def audit_file(path: Path, data_key: str | None, identity: NodeIdentity) -> tuple[dict | None, list[str]]:
    """(the ledger's verified state, []) or (None, one line per problem found), for the file at `path`.
    `data_key` None: the key the file names (verify)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, [f"cannot be read ({err.strerror})"]
    return audit_bytes(raw, path, data_key, identity)


def audit_bytes(raw: bytes, path: Path, data_key: str | None, identity: NodeIdentity) -> tuple[dict | None, list[str]]:
    """`audit_file` of the bytes `raw` read from `path`."""
    try:
        state = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        return None, [f"is not a ledger (unreadable JSON: {err})"]
    if not isinstance(state, dict):
        return None, [f"is not a ledger (its JSON is {type(state).__name__}, not an object)"]
    if state.get("version") != LEDGER_VERSION:
        return None, [f"has version {state.get('version')!r}; this fedsafe reads version {LEDGER_VERSION} (keep an "
                      "older fedsafe's ledger: it records past spend)"]
    key = state.get("data_key")
    if not isinstance(key, str) or (data_key is not None and key != data_key):
        return None, [f"is the ledger of data key {key!r}, not {data_key!r}"]
    if path.name != ledger_filename(key):
        return None, [f"holds data key {key!r}, whose ledger is named {ledger_filename(key)}: renamed or copied"]
    entries = state.get("entries")
    if not isinstance(entries, list) or not entries:
        return None, ["has no entry log (emptied or not a ledger): a ledger file always holds its entries"]
    try:
        node_id = identity.node_id
    except (OSError, ValueError) as err:
        return None, [f"cannot be checked: {err}"]
    if node_id is None:
        return None, [f"has no node identity file {identity.path} beside it (deleted?); restore it from backup"]
    problems = _check_chain(entries, genesis(node_id, key))
    if problems:
        return None, problems
    views, problems = _derive(entries)
    for name, derived in views.as_state().items():
        if name not in state:
            problems.append(f"lacks its {name!r} field")
        elif state[name] != derived:
            problems.append(_view_mismatch(name, state[name], derived))
    return (None, problems) if problems else (state, [])


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number a ledger may hold")


def _view_mismatch(name: str, stored: Any, derived: Any) -> str:
    if name == "accountant":
        try:
            stored_steps = sum(int(n) for _, _, n in stored["history"])
        except (TypeError, ValueError, KeyError):
            stored_steps = "unreadable"
        derived_steps = sum(n for _, _, n in derived["history"])
        return (f"its accountant (steps {stored_steps}) differs from the {len(derived['history'])} reservations "
                f"in its entry log ({derived_steps} steps): edited")
    return f"its {name!r} differs from what its entry log records: edited"


# ---- the ledger -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Verified:
    """A ledger file's bytes as audited (or written) by one PrivacyLedger, the node id its chain was checked
    against, and the state those bytes hold."""

    raw: bytes
    node_id: str | None
    state: dict[str, Any]


class PrivacyLedger:
    def __init__(self, path: Path, data_key: str, identity: NodeIdentity, state: dict[str, Any] | None = None,
                 records=None, verified: _Verified | None = None) -> None:
        self.path = path
        self.data_key = data_key
        self.identity = identity
        self.records = records  # the record hashes of a node's own data file (kept beside the identity file)
        self._state = state or {"version": LEDGER_VERSION, "data_key": data_key, "entries": [], **_Views([], [], {}).as_state()}
        self._verified = verified  # the file as this object last audited or wrote it (see _read_under_lock)
        self._transaction_depth = 0
        self._transaction_durable = False
        self._epsilons: dict[tuple, float] = {}  # ε of each spend history already composed (see _epsilon)

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | Path, data_key: str, records=None) -> PrivacyLedger:
        """The verified ledger of `data_key` in `state_dir`, or an empty one for data never trained here.
        LedgerError, naming the file and what is wrong, otherwise. `records`, the hashes of a node's own
        data records (fedsafe.client.data.record_hashes): new data sharing records with another key's is
        refused, and they are kept with the ledger once it is written."""
        state_dir = Path(state_dir).expanduser()
        identity = NodeIdentity(state_dir)
        path = state_dir / ledger_filename(data_key)
        try:
            exists = path.exists()
            trained_before = not exists and identity.has_trained(data_key)
        except (OSError, ValueError) as err:
            raise LedgerError(f"node identity file {err}; refusing to train") from None
        if trained_before:
            raise LedgerError(
                f"privacy ledger {path} is missing, but the node identity file {identity.path} records that this "
                f"node has trained on data {data_key!r}: refusing to start its budget again at zero. Restore the "
                f"file from backup; to knowingly start from zero, run `fedsafe ledger forget --state-dir "
                f"{state_dir} --data-key '{data_key}'` (recorded in the identity file)"
            )
        if not exists:
            if records is not None:
                cls._refuse_shared_records(identity, data_key, records)
            return cls(path, data_key, identity, records=records)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise LedgerError(f"privacy ledger {path} cannot be read ({err.strerror}); refusing to train rather "
                              "than forget past spend — restore it from backup") from None
        state, problems = audit_bytes(raw, path, data_key, identity)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s): `fedsafe ledger verify --state-dir {state_dir}`)" \
                if len(problems) > 1 else ""
            raise LedgerError(f"privacy ledger {path} {problems[0]}{more}; refusing to train rather than forget "
                              "past spend — restore it from backup")
        return cls(path, data_key, identity, state, records, _Verified(raw, identity.node_id, state))

    @staticmethod
    def _refuse_shared_records(identity: NodeIdentity, data_key: str, records) -> None:
        try:
            shared = identity.sharing_records(data_key, records)
        except (OSError, ValueError) as err:
            raise LedgerError(f"node identity file {err}; refusing to train") from None
        if shared:
            key, ledger_file, count = max(shared, key=lambda found: found[2])
            raise LedgerError(
                f"{count} of the {len(records)} records of this data were trained on under data key {key!r} "
                f"(privacy ledger {identity.state_dir / ledger_file}): a copy or edited version of that data "
                f"spends that budget, not a new one. Set dataset-id={key!r} (fedsafe node --dataset-id) to "
                "charge that ledger"
            )

    @contextlib.contextmanager
    def transaction(self, must_survive: bool = True):
        """Read-modify-write under an exclusive lock, so two processes on one dataset cannot
        both spend what only one of them may. Written (durably) only where an entry was added: a run's
        plan read back every round changes nothing, and rewriting it cost two fsyncs a node-round.
        `must_survive=False`: a power cut may leave the previous version (whole), never a torn one.

        Transactions nest: the ledger's own steps (plan_run, reserve, settle) inside a caller's transaction
        (the gate's plan and reservation) read the file once and write it once, when the outermost ends,
        durably if any step asked for it. Entries added before an exception are written too: each was
        checked when it was added, and a step that refuses (BudgetExhausted) adds nothing, so a run's new
        plan followed by a refused reservation leaves the plan recorded, as two transactions did."""
        if self._transaction_depth:
            self._transaction_durable = self._transaction_durable or must_survive
            self._transaction_depth += 1
            try:
                yield
            finally:
                self._transaction_depth -= 1
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._state = self._read_under_lock()
                entries = len(self._state["entries"])
                self._transaction_depth, self._transaction_durable = 1, must_survive
                try:
                    yield
                finally:
                    self._transaction_depth = 0
                    if len(self._state["entries"]) != entries:
                        self._save(self._transaction_durable)
        except OSError as err:  # a full disk, a read-only state dir: no spend may go unrecorded
            raise LedgerError(f"privacy ledger {self.path} cannot be written ({err.strerror or err}); refusing "
                              "to train without a record of the spend") from None

    def _read_under_lock(self) -> dict[str, Any]:
        """The ledger's state as the file holds it now, verified as `open` verifies it.

        Audited afresh (`open`: the hash chain, every entry against its plan, the derived views) unless the
        file's bytes are exactly those this object last audited or wrote, and the node identity file still
        names the node those bytes were checked against. Those two are everything the audit reads besides
        this object's path and key, so the audit would give the same state again; a node-round (open, plan,
        reserve, settle) then audits its file once instead of four times.

        As an attacker: any change to the file between two transactions — a hand edit, a file copied in,
        a truncation, another process' or another PrivacyLedger object's spend (each entry carries its own
        time and hash) — changes its bytes, and a replaced identity file changes the node id: either is
        audited in full. Nothing is trusted from file metadata (size, mtime, inode), which an edit can keep.
        Bytes that are exactly the verified ones are the verified ledger, whoever wrote them. The file is
        read under the lock, so no write lands between this comparison and the transaction's own write."""
        verified = self._verified
        if verified is not None:
            try:
                unchanged = (self.path.read_bytes() == verified.raw
                             and NodeIdentity(self.path.parent).node_id == verified.node_id)
            except (OSError, ValueError):  # gone or damaged: `open` names the problem
                unchanged = False
            if unchanged:
                return verified.state
        fresh = PrivacyLedger.open(self.path.parent, self.data_key)
        self._verified = fresh._verified
        return fresh._state

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._state))

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Add one entry to the log, chained to the last, and re-derive the views (LedgerError if the
        entry would make the ledger inconsistent: nothing is then written)."""
        entries = self._state["entries"]
        if entries:
            prev = entries[-1]["hash"]
        else:
            prev = genesis(self.identity.ensure(), self.data_key)
        entry = {"kind": kind, **fields, "time": time.time(), "prev": prev}
        try:
            entry["hash"] = entry_hash(entry)
        except ValueError as err:
            raise LedgerError(f"privacy ledger {self.path}: refusing a {kind} entry holding {err}") from None
        views, problems = _derive([*entries, entry])
        if problems:
            raise LedgerError(f"privacy ledger {self.path}: refusing an entry that would make it inconsistent: "
                              f"{problems[-1]}")
        self._state = {**self._state, "entries": [*entries, entry], **views.as_state()}
        return entry

    def _save(self, must_survive: bool = True) -> None:
        """Write atomically and durably (a crash leaves the old file or the new one, never half), then
        record in the node identity file that this key has been trained on. `must_survive=False` leaves
        the rename itself unsynced: a power cut may then bring back the previous version."""
        text = json.dumps(self._state, indent=1, allow_nan=False)
        with atomic_write(self.path, sync_directory=must_survive) as handle:
            handle.write(text)
        # What the next transaction compares the file with: these bytes, the state they hold (read back from
        # them, so it is exactly what `open` would derive), and the node id the chain was built from.
        self._state = json.loads(text)
        self._verified = _Verified(text.encode(), self.identity.node_id, self._state)
        if self.records is not None:
            self.identity.record_records(self.path.name, self.records)
            self.records = None  # kept: once per ledger object is enough
        try:
            self.identity.record_trained(self.data_key, self.path.name)
        except ValueError as err:  # a damaged identity file
            raise LedgerError(f"node identity file {err}; refusing to train") from None

    # ---- reading -----------------------------------------------------------------------------
    @property
    def history(self) -> list[Spend]:
        return [(float(s), float(q), int(n)) for s, q, n in self._state["accountant"]["history"]]

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def noise_shares(self) -> list[int]:
        """m of each reservation, in the order of `history` (1: local DP, the node added all the noise)."""
        return [int(e.get("noise_shares", 1)) for e in self._state["entries"] if e["kind"] == "reserve"]

    def spends(self, basis: str = OWN_UPDATE) -> list[Spend]:
        """The history on `basis`: own-update, each release as the node's update alone (what its optimizer
        did, `history`); aggregate, each distributed-DP release as the sum of m noise shares."""
        if basis == OWN_UPDATE:
            return self.history
        if basis != AGGREGATE:
            raise ValueError(f"unknown ε basis {basis!r}; choose {OWN_UPDATE} or {AGGREGATE}")
        return [aggregate_spend(spend, m) for spend, m in zip(self.history, self.noise_shares, strict=True)]

    def epsilon(self, delta: float, accountant: str = "rdp", basis: str = OWN_UPDATE) -> float:
        return self._epsilon(self.spends(basis), delta, accountant)

    def _epsilon(self, spends: list[Spend], delta: float, accountant: str) -> float:
        """accounting.epsilon of `spends`, each history composed once by this object: a node-round asks for
        the same few again (ε after the reservation, as the round's figure; this run's ε, which is all spend
        on a dataset's first run). Keyed by the checked spends themselves (check_spend raises as epsilon
        would), δ and the accountant, so a value is never stale: another history is another key."""
        key = (tuple(map(check_spend, spends)), delta, accountant)
        if key not in self._epsilons:
            self._epsilons[key] = epsilon(key[0], delta, accountant)
        return self._epsilons[key]

    def run_plan(self, run_id: str) -> RunPlan | None:
        plan = self._state["runs"].get(run_id)
        return RunPlan(**plan) if plan else None

    def run_token(self, run_id: str) -> str | None:
        """A stable identifier of run `run_id` on this ledger: the hash of its plan entry (None before it
        is planned). Unique per node state directory, data key and run, the same on every round of the
        run, and unpredictable to the coordinator (the chain starts from the node's random identity):
        what a simulated node's noise seed must include so that no two runs share a noise stream."""
        return next((e["hash"] for e in self._state["entries"] if e["kind"] == "plan" and e["run"] == run_id), None)

    def rounds_of(self, run_id: str) -> list[dict[str, Any]]:
        # Copies: the state is kept between transactions as verified (_read_under_lock), so no caller may
        # change it in place.
        return [dict(r) for r in self._state["rounds"] if r["run"] == run_id]

    def project(self, run_id: str, spend: Spend, delta: float, accountant: str = "rdp", noise_shares: int = 1,
                cap_basis: str = OWN_UPDATE) -> tuple[float, float]:
        """(ε of all spend on this data on `cap_basis`, ε of this run's spend against the aggregate) if one
        more `spend` (σ the node's own, shared by `noise_shares` nodes) were taken; changes nothing."""
        return self._epsilon(self._spends_with(spend, noise_shares, cap_basis), delta, accountant), self._epsilon(
            [*self._run_spends(run_id), aggregate_spend(spend, noise_shares)], delta, accountant)

    def _spends_with(self, spend: Spend, noise_shares: int, basis: str) -> list[Spend]:
        """All spend on this data on `basis` (`spends`) with one more `spend`, the node's own σ shared by
        `noise_shares` nodes, on the same basis."""
        return [*self.spends(basis), spend if basis == OWN_UPDATE else aggregate_spend(spend, noise_shares)]

    def _run_spends(self, run_id: str) -> list[Spend]:
        """Run `run_id`'s spends against the aggregate: what its grant (the run's ε) is charged with."""
        aggregate = self.spends(AGGREGATE)
        return [aggregate[r["entry"]] for r in self.rounds_of(run_id)]

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
        noise_shares: int = 1,
        cap_basis: str = OWN_UPDATE,
    ) -> RunPlan:
        """Fix σ for a run, once: the run alone stays within `run_epsilon`, and everything this
        dataset has ever spent, this run included, within `max_epsilon`. NoiseTooHigh, leaving the
        ledger untouched, where that σ is above `max_noise_multiplier` (checked on every round: the
        operator may have lowered the bound since the run began).

        Distributed DP (`noise_shares` m > 1): σ is the aggregate's, the run's grant is charged against
        the aggregate, and the node adds σ/√m; the lifetime cap counts the ε of `cap_basis` (own-update:
        the node's update alone at σ/√m; aggregate: the sum at σ)."""
        with self.transaction():
            existing = self.run_plan(run_id)
            if existing is not None:
                _check_noise(existing.aggregate_noise_multiplier, max_noise_multiplier)
                return existing
            steps = steps_per_round * planned_rounds
            try:
                sigma_run = calibrate_noise([], sample_rate, steps, run_epsilon, delta, accountant)
            except CalibrationError:
                # No σ the accountant tries meets so small a grant: it would need more noise than any bound.
                _check_noise(math.inf, max_noise_multiplier)
                raise
            sigma = max(sigma_run, self._cap_sigma(sigma_run, sample_rate, steps, max_epsilon, delta, accountant,
                                                   noise_shares, cap_basis))
            _check_noise(sigma, max_noise_multiplier)
            plan = RunPlan(
                noise_multiplier=sigma / math.sqrt(noise_shares),
                sample_rate=sample_rate,
                steps_per_round=steps_per_round,
                planned_rounds=planned_rounds,
                target_epsilon=min(run_epsilon, max_epsilon),
                noise_shares=check_noise_shares(noise_shares),
            )
            self._append("plan", run=run_id, **plan.record())
        return plan

    def _cap_sigma(self, sigma_run: float, sample_rate: float, steps: int, max_epsilon: float, delta: float,
                   accountant: str, noise_shares: int, cap_basis: str) -> float:
        """The smallest aggregate σ whose run keeps everything spent on this data, on `cap_basis`, within
        the lifetime cap (BudgetExhausted where none does)."""
        history = self.spends(cap_basis)
        # The cap's basis sees σ/√m where it counts the node's own update, σ where it trusts the sum.
        scale = math.sqrt(noise_shares) if cap_basis == OWN_UPDATE else 1.0
        if self._epsilon([*history, (sigma_run / scale, sample_rate, steps)], delta, accountant) <= max_epsilon:
            # σ_run already keeps the lifetime cap, so the cap's own (smaller) σ cannot be the larger:
            # skip its calibration (seconds of RDP evaluations, in every fresh ClientApp process).
            return sigma_run
        try:
            return scale * calibrate_noise(history, sample_rate, steps, max_epsilon, delta, accountant)
        except ValueError as err:
            raise BudgetExhausted(
                f"privacy budget exhausted: node cap ε={max_epsilon:g} ({cap_basis}) cannot fund this run ({err})"
            ) from None

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
        noise_shares: int = 1,
        cap_basis: str = OWN_UPDATE,
    ) -> float:
        """Record a round's spend before it is taken; refuse it if a budget would be exceeded: the
        node's lifetime cap over all spend on this data (on `cap_basis`), and the run's own ε over this
        run's spend (against the aggregate: the σ of `spend` times √`noise_shares`).
        A planned run's rounds must reserve exactly its plan's (σ, q, steps, m) (LedgerError otherwise).

        A round asked for twice (a coordinator resumed after a crash) is charged twice: it is trained
        twice. Returns ε after the round. Raises BudgetExhausted, leaving the ledger untouched, otherwise.
        """
        try:
            spend = check_spend(spend, min_steps=1)
        except ValueError as err:
            raise LedgerError(f"privacy ledger {self.path}: refusing to reserve round {server_round}: {err}") from None
        with self.transaction():
            return self._reserve(run_id, server_round, spend, max_epsilon, run_epsilon, delta, accountant,
                                 noise_shares, cap_basis)

    def _reserve(
        self, run_id: str, server_round: int, spend: Spend, max_epsilon: float,
        run_epsilon: float | None, delta: float, accountant: str, noise_shares: int, cap_basis: str,
    ) -> float:
        shared = aggregate_spend(spend, noise_shares)
        if run_epsilon is not None:
            run_after = self._epsilon([*self._run_spends(run_id), shared], delta, accountant)
            if run_after > run_epsilon + 1e-9:
                raise BudgetExhausted(
                    f"privacy budget exhausted: round {server_round} would take run {run_id} to "
                    f"ε={run_after:.3f}, over the ε={run_epsilon:g} it was granted (δ={delta:g})"
                )
        after = self._epsilon(self._spends_with(spend, noise_shares, cap_basis), delta, accountant)
        # 1e-9: bisection and accountant arithmetic agree to far better than this.
        if after > max_epsilon + 1e-9:
            spent = self.epsilon(delta, accountant, cap_basis)
            raise BudgetExhausted(
                f"privacy budget exhausted: this round would raise ε ({cap_basis}) from {spent:.3f} to {after:.3f}, "
                f"over the node's cap ε={max_epsilon:g} (δ={delta:g}) for data {self.data_key!r}"
            )
        shares = {"noise_shares": check_noise_shares(noise_shares)} if noise_shares != 1 else {}
        self._append("reserve", run=run_id, round=server_round, spend=list(spend), **shares)
        return after

    def settle(self, run_id: str, server_round: int, actual: int | list[Spend]) -> None:
        """Close a round's reservation with what training actually did: `actual` is the DP optimizer's
        own accountant history (a list of (σ, q, steps)), or a step count at the reserved σ and q.

        Anything but exactly the reserved (σ, q, steps) is recorded as withheld (the reservation stays
        charged) and raises SettlementMismatch: the update must not leave the node, because what it
        spent is not what the ledger composed.

        Not synced to survive a power cut on its own (one fsync fewer a round): the reservation it closes
        is already durable and charged, so losing a settlement leaves the round charged as reserved —
        never less — and the next reservation's durable write carries it."""
        with self.transaction(must_survive=False):
            record = next((r for r in reversed(self.rounds_of(run_id))
                           if r["round"] == server_round and r["status"] == "reserved"), None)
            if record is None:
                raise LedgerError(f"privacy ledger {self.path}: no open reservation for round {server_round} "
                                  f"of run {run_id}")
            reserved = self.history[record["entry"]]
            if isinstance(actual, int):
                actual = [(reserved[0], reserved[1], actual)] if actual > 0 else []
            try:
                actual = [list(check_spend(s)) for s in actual]
            except ValueError as err:
                actual, bad = [], err
            else:
                bad = None
            matches = bad is None and len(actual) == 1 and _same_spend(tuple(actual[0]), reserved)
            self._append("settle", run=run_id, round=server_round, actual=actual,
                         outcome="spent" if matches else "withheld")
        if not matches:
            did = f"an unreadable spend ({bad})" if bad else (
                ", then ".join(f"{n} steps at σ={s:.4g}, q={q:.4g}" for s, q, n in actual) or "no DP-SGD step")
            raise SettlementMismatch(
                f"round {server_round} reserved {reserved[2]} steps at σ={reserved[0]:.4g}, q={reserved[1]:.4g} "
                f"but training did {did}: the update is withheld (privacy ledger {self.path})"
            )


# ---- a whole state directory ----------------------------------------------------------------------------
@dataclass
class StateDirAudit:
    ledgers: list[PrivacyLedger]  # the ledgers that verify
    problems: list[str]  # one line per problem, each naming its file


def audit_state_dir(state_dir: str | Path) -> StateDirAudit:
    """Verify every ledger in `state_dir` and the node identity file: each ledger's chain, entries and
    views; every data key the identity records as trained has its ledger; no ledger lacks an identity."""
    directory = Path(state_dir).expanduser()
    identity = NodeIdentity(directory)
    ledgers, problems = [], []
    try:
        trained = identity.trained_keys()
    except (OSError, ValueError) as err:
        trained, problems = {}, [str(err)]
    for path in sorted(directory.glob("*.json")):
        state, found = audit_file(path, None, identity)
        problems += [f"{path}: {line}" for line in found]
        if state is not None:
            ledgers.append(PrivacyLedger(path, state["data_key"], identity, state))
    present = {ledger.data_key for ledger in ledgers} | {p.name for p in directory.glob("*.json")}
    for key, filename in trained.items():
        if key not in present and filename not in present:
            problems.append(f"{directory / filename}: missing, but {identity.path.name} records that this node "
                            f"trained on data {key!r} (restore it from backup, or `fedsafe ledger forget`)")
    return StateDirAudit(ledgers, problems)


def forget(state_dir: str | Path, data_key: str, by: str) -> Path:
    """The operator's explicit reset of `data_key`'s budget, after its ledger was lost: recorded (who, when)
    in the node identity file, so the next round on that data starts a new ledger at zero. Never deletes
    a ledger: one that still exists must be moved away first. Returns the identity file."""
    directory = Path(state_dir).expanduser()
    identity = NodeIdentity(directory)
    path = directory / ledger_filename(data_key)
    if path.exists():
        raise LedgerError(f"privacy ledger {path} exists: `forget` never deletes a ledger (it is the record of "
                          f"past spend); move it out of {directory} first if you mean to start from zero")
    try:
        known = identity.has_trained(data_key)
    except (OSError, ValueError) as err:
        raise LedgerError(f"node identity file {err}") from None
    if not known:
        raise LedgerError(f"{identity.path} records no training on data {data_key!r}: nothing to forget")
    identity.record_forgotten(data_key, path.name, by)
    return identity.path


def _check_noise(noise_multiplier: float, bound: float) -> None:
    """Raise NoiseTooHigh (inside a transaction: nothing is written) where σ is above the node's bound."""
    if noise_multiplier > bound:
        needed = f"σ={noise_multiplier:.3g}" if math.isfinite(noise_multiplier) else "σ beyond any the accountant tries"
        raise NoiseTooHigh(
            f"the run's grant needs noise multiplier {needed}, above this node's max-noise-multiplier="
            f"{bound:g}: its updates would be noise (grant the run more ε, or plan fewer rounds)"
        )
