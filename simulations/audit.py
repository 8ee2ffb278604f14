"""Empirical privacy audit of a simulated federation, in one training run — SIMULATION ONLY.

Following Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846): m canaries, each included independently with probability ½, go into one node's
training; the federation trains as configured (the real round loop, strategy and node handler, in this
process); an auditor scores every canary, guesses "member" for the k highest scores and "non-member" for
the k lowest, and the number of correct guesses becomes, at 95 % confidence, a lower bound on the ε
of the run (at the run's δ). A lower bound above the ε the node's ledger reports would be a bug in the
accounting or the training.

Two audits in the same run:

* white-box — gradient canaries: Dirac vectors ±C·e_j (C the clipping norm) on distinct model
  coordinates j, added to the canary node's clipped gradient sum exactly as one more record's clipped
  gradient would be (Poisson-sampled at the node's rate q each DP-SGD step, before the noise). The
  auditor is the coordinator: its score is the canary coordinate's movement, summed over the node's
  round updates it received.
* black-box — record canaries: random inputs with random labels appended to the node's data (a
  throwaway data file); the score is minus the final global model's loss on the canary.

The canaries exist only in this driver: the hook that adds gradient canaries is installed for the
duration of the audit, acts only inside the canary node's ClientApp call (a mod of the audit's own
ClientApp), and ledgers and data files live in a temporary directory removed at the end. A deployed
node has no such hook, and refuses any train request with a key it does not know, a canary request
included (fedsafe.client.policy.TrainRequest.from_config).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedsafe import protocol
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.local import NODE_ID_BASE, LocalGrid

CONFIDENCE = 0.95
CANARY_NODE = 0  # the partition whose node trains with the canaries
MIN_FREE_COORDINATES = 16  # canary-free coordinates a tensor needs to estimate its own noise


# ---------------------------------------------------------------------------------------------------
# The paper's bound


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v of r guesses correct] for an (ε, δ)-DP run with m canaries each included with probability ½.

    Steinke, Nasr & Jagielski 2023, main theorem for (ε, δ)-DP with abstentions, as the paper's own
    p-value routine computes it: the tail β of Binomial(r, q) at v, q = e^ε / (1 + e^ε) (ε-DP randomised
    response), plus δ's share 2m·δ·α with α = max_i P[v − i ≤ Binomial(r, q) < v] / i.
    """
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]; got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha = 0.0
    below = 0.0  # P[v − i ≤ Binomial(r, q) < v]
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest ε that `v` correct of `r` guesses on `m` canaries reject at `confidence`: the run is not
    (ε, δ)-DP for any smaller ε, with probability ≥ `confidence` over the canaries' coin flips. 0 when
    the guesses are no better than chance. Bisection, as in the paper's code (p grows with ε)."""
    p = 1.0 - confidence
    if not 0 < p < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if audit_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) < p:
        low, high = high, 2 * high
        if high > 1e3:  # all correct with δ = 0 rejects every ε of practical size
            return high
    for _ in range(50):
        middle = (low + high) / 2
        if audit_p_value(m, r, v, middle, delta) < p:
            low = middle
        else:
            high = middle
    return low


# ---------------------------------------------------------------------------------------------------
# Guessing


@dataclass(frozen=True)
class Guesses:
    """One audit's outcome: k "in" guesses on the top scores and k "out" on the bottom ones."""

    kind: str  # white-box or black-box
    canaries: int  # m
    guesses: int  # r = 2k
    correct: int  # v
    epsilon_lower_bound: float
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)  # (guesses, accuracy), for the plot

    @property
    def accuracy(self) -> float:
        return self.correct / self.guesses if self.guesses else float("nan")


def correct_guesses(scores: np.ndarray, members: np.ndarray, k: int) -> int:
    """Correct guesses among "member" for the k highest scores and "non-member" for the k lowest.
    Ties are broken by a fixed random order, not by canary index (which would leak nothing, but could
    line up with the membership draw in a test)."""
    order = np.lexsort((np.random.default_rng(0).random(len(scores)), scores))
    return int(members[order[len(order) - k:]].sum() + (~members[order[:k]]).sum())


def guess(kind: str, scores: np.ndarray, members: np.ndarray, k: int, delta: float) -> Guesses:
    m = len(scores)
    if not 1 <= k <= m // 2:
        raise ValueError(f"guesses per side must be in [1, {m // 2}] for {m} canaries; got {k}")
    v = correct_guesses(scores, members, k)
    steps = sorted({max(1, round(k_i)) for k_i in np.geomspace(1, m // 2, 20)})
    curve = [(2 * k_i, correct_guesses(scores, members, k_i) / (2 * k_i)) for k_i in steps]
    return Guesses(kind, m, 2 * k, v, epsilon_lower_bound(m, 2 * k, v, delta), curve)


# ---------------------------------------------------------------------------------------------------
# Gradient canaries (white-box)

_ACTIVE: contextvars.ContextVar[GradientCanaries | None] = contextvars.ContextVar("fedsafe_canaries", default=None)


@dataclass
class GradientCanaries:
    """m Dirac canaries ±norm·e_j on distinct coordinates of the model's trainable parameters."""

    names: list[str]  # trainable parameters, in the order the node's optimizer holds them
    param: np.ndarray  # (m,) index into names
    offset: np.ndarray  # (m,) flat index in that parameter
    sign: np.ndarray  # (m,) ±1
    members: np.ndarray  # (m,) bool: included in training
    norm: float  # the clipping norm C: clipping leaves the canary as it is
    private: bool  # DP-SGD (insert before the noise) or plain SGD (insert into the batch gradient)
    sample_rate: float = 0.0  # q of the node's Poisson sampling, set once its data size is known
    batch_size: int = 1  # plain SGD: the mean loss divides a record's gradient by the batch size
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    inserted: int = 0  # canary gradients added, over all steps (a test checks the hook fires)

    @classmethod
    def draw(cls, shapes: dict[str, tuple[int, ...]], m: int, norm: float, private: bool,
             rng: np.random.Generator) -> GradientCanaries:
        names = list(shapes)
        sizes = np.array([int(np.prod(shapes[n])) for n in names])
        if m > sizes.sum():
            raise ConfigError(f"{m} gradient canaries need as many model coordinates; the model has {sizes.sum()}")
        flat = rng.choice(sizes.sum(), size=m, replace=False)
        param = np.searchsorted(np.cumsum(sizes), flat, side="right")
        offset = flat - np.concatenate([[0], np.cumsum(sizes)])[param]
        return cls(names, param, offset, rng.choice([-1.0, 1.0], size=m), rng.random(m) < 0.5, norm, private,
                   rng=rng)

    def step_canaries(self) -> np.ndarray:
        """The member canaries this step samples: each with probability q, as a record would be."""
        return np.flatnonzero(self.members & (self.rng.random(len(self.members)) < self.sample_rate))

    def add_to(self, tensors: list, scale: float) -> None:
        """Add scale·(sum of this step's sampled canaries) to `tensors` (one per trainable parameter)."""
        import torch

        if len(tensors) != len(self.names):
            raise AuditError(f"canary hook: the optimizer holds {len(tensors)} parameters, the model "
                               f"{len(self.names)} (frozen parameters are not supported by the audit)")
        chosen = self.step_canaries()
        self.inserted += len(chosen)
        for index, tensor in enumerate(tensors):
            mine = chosen[self.param[chosen] == index]
            if len(mine):
                values = torch.as_tensor(self.sign[mine] * self.norm * scale, dtype=tensor.dtype)
                tensor.view(-1).index_add_(0, torch.as_tensor(self.offset[mine]), values)

    def scores(self, deltas: list[dict[str, np.ndarray]]) -> np.ndarray:
        """White-box score per canary, from the node's round updates less the other nodes' mean (`deltas`):
        how far each round moved the canary's coordinate against its sign (SGD steps against the
        gradient), in units of that round's and tensor's data noise, combined over rounds as a z-score
        (inverse-variance weights: the signal per round is alike, the data's drift is not). The noise
        is the spread of the tensor's coordinates that carry no canary; no membership bit is used."""
        weighted = np.zeros(len(self.members))
        precision = np.zeros(len(self.members))
        carriers = {index: self.offset[self.param == index] for index in range(len(self.names))}
        for delta in deltas:
            free = {name: np.delete(delta[name].reshape(-1), carriers[i]) for i, name in enumerate(self.names)}
            pooled = float(np.var(np.concatenate(list(free.values()))))
            for index, name in enumerate(self.names):
                mine = self.param == index
                if not mine.any():
                    continue
                flat = delta[name].reshape(-1)
                # A tensor with few free coordinates (a small bias) takes the round's pooled spread.
                variance = float(np.var(free[name])) if len(free[name]) >= MIN_FREE_COORDINATES else pooled
                variance = max(variance, 1e-12)  # a tensor the data never moves: the canary alone moves it
                weighted[mine] += -self.sign[mine] * flat[self.offset[mine]] / variance
                precision[mine] += 1.0 / variance
        return weighted / np.sqrt(precision)


@contextlib.contextmanager
def gradient_canary_hook() -> Iterator[None]:
    """For the audit's duration: Opacus' DP optimizers add the active node's sampled gradient canaries to
    the clipped sum before the noise; plain torch optimizers (DP off) add them to the batch gradient.
    Both act only while a GradientCanaries plan is active (inside the canary node's ClientApp call)."""
    import torch
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    originals = {cls: cls.__dict__["add_noise"] for cls in (DPOptimizer, DPOptimizerFastGradientClipping)
                 if "add_noise" in cls.__dict__}

    def patched(original):
        def add_noise(self):
            plan = _ACTIVE.get()
            if plan is not None and plan.private:
                plan.add_to([p.summed_grad for p in self.params], 1.0)
            return original(self)
        return add_noise

    def plain_step(optimizer, _args, _kwargs):
        plan = _ACTIVE.get()
        if plan is not None and not plan.private:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            plan.add_to([p.grad for p in params], 1.0 / plan.batch_size)

    for cls, original in originals.items():
        setattr(cls, "add_noise", patched(original))
    handle = register_optimizer_step_pre_hook(plain_step)
    try:
        yield
    finally:
        handle.remove()
        for cls, original in originals.items():
            setattr(cls, "add_noise", original)


# ---------------------------------------------------------------------------------------------------
# The audited federation


@dataclass(frozen=True)
class AuditOptions:
    num_nodes: int = 3
    canaries: int = 1000  # m, gradient canaries (white-box)
    record_canaries: int = 200  # record canaries (black-box)
    guess_fraction: float = 0.05  # k = fraction · m guesses on each side
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"nodes must be >= 1; got {self.num_nodes}")
        if self.canaries < 2 or self.record_canaries < 2:
            raise ConfigError(f"canaries and record-canaries must be >= 2; got {self.canaries}, {self.record_canaries}")
        if not 0 < self.guess_fraction <= 0.5:
            raise ConfigError(f"guess-fraction must be in (0, 0.5]; got {self.guess_fraction}")

    def k(self, m: int) -> int:
        return max(1, int(self.guess_fraction * m))


@dataclass(frozen=True)
class AuditReport:
    dp: bool
    reported_epsilon: float | None  # the canary node's ledger after the run (None: DP off)
    delta: float
    white_box: Guesses
    black_box: Guesses
    seconds: float
    plot: str

    @property
    def max_accuracy(self) -> float | None:
        """The best guess accuracy an (ε, 0)-DP run allows: what the accounting predicts an optimal attack gets."""
        if self.reported_epsilon is None:
            return None
        return 1.0 / (1.0 + math.exp(-self.reported_epsilon))

    @property
    def contradicted(self) -> bool:
        """A lower bound above the reported ε: the accounting or the training is wrong."""
        return self.reported_epsilon is not None and max(
            self.white_box.epsilon_lower_bound, self.black_box.epsilon_lower_bound) > self.reported_epsilon

    def lines(self) -> list[str]:
        reported = "no DP (ε = ∞)" if self.reported_epsilon is None else f"ε = {self.reported_epsilon:.3f}"
        out = [f"reported by the canary node's ledger: {reported} at δ = {self.delta:g}"]
        if self.max_accuracy is not None:
            out.append(f"the accounting allows at most {self.max_accuracy:.1%} correct membership guesses")
        for g in (self.white_box, self.black_box):
            out.append(f"{g.kind}: {g.correct}/{g.guesses} guesses correct ({g.accuracy:.1%}) on m = {g.canaries} "
                       f"canaries → ε ≥ {g.epsilon_lower_bound:.3f} (95 % confidence)")
        out.append(f"{self.seconds:.1f} s; guess accuracy plot: {self.plot}")
        return out


class AuditError(RuntimeError):
    """The run gave the audit nothing to judge (the canary node sent no update, the canaries never reached it)."""


class PrivacyContradiction(RuntimeError):
    """The audit's lower bound exceeds the reported ε: a bug in the accounting or the training."""

    def __init__(self, report: AuditReport) -> None:
        self.report = report
        super().__init__(
            f"BUG: the audit's lower bound (white-box ε ≥ {report.white_box.epsilon_lower_bound:.3f}, black-box "
            f"ε ≥ {report.black_box.epsilon_lower_bound:.3f}) exceeds the ε the ledger reports "
            f"({report.reported_epsilon:.3f}): the accounting or the training is wrong")


def audit(cfg: RunConfig, options: AuditOptions = AuditOptions(), progress=None) -> AuditReport:
    """Run `cfg` once over `options.num_nodes` virtual nodes with canaries in node 0; audit it.
    Raises PrivacyContradiction (after writing its report) if a lower bound exceeds the reported ε."""
    from fedsafe.simulations.engine import quiet_flower_environment
    from fedsafe.simulations.run import SimulationOptions, validate_against_data

    _check_auditable(cfg)
    quiet_flower_environment()
    cfg = RunConfig(**{**cfg.__dict__, "num_partitions": options.num_nodes, "min_nodes": options.num_nodes})
    validate_against_data(cfg, SimulationOptions(num_nodes=options.num_nodes))
    started = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 17])
    with tempfile.TemporaryDirectory(prefix="fedsafe-audit-") as scratch:
        gradient_canaries, records, record_members = _prepare_canaries(cfg, options, rng, Path(scratch))
        deltas, final, reported = _train_federation(cfg, options, gradient_canaries, Path(scratch), progress)
    delta = cfg.delta
    white = guess("white-box", gradient_canaries.scores(deltas), gradient_canaries.members,
                  options.k(options.canaries), delta)
    black = guess("black-box", _record_scores(cfg, final, records), record_members,
                  options.k(options.record_canaries), delta)
    plot = cfg.out_path / "audit_accuracy.png"
    report = AuditReport(cfg.dp, reported if cfg.dp else None, delta, white, black,
                         time.perf_counter() - started, str(plot))
    _write(report, plot)
    if report.contradicted:
        raise PrivacyContradiction(report)
    return report


def _check_auditable(cfg: RunConfig) -> None:
    if cfg.secagg:
        raise ConfigError("the audit reads each round's update of the canary node; secagg hides it: "
                          "audit without secagg")
    if cfg.freeze:
        raise ConfigError("the audit places canaries on every trainable coordinate; audit without freeze")
    if cfg.resume:
        raise ConfigError("an audit is one fresh run: audit without resume")
    from fedsafe.server.app import global_model_setup

    _, model_config, _ = global_model_setup(cfg)
    if model_config.get("task", "classification") != "classification":
        raise ConfigError(f"the audit's record canaries need a classification task; {cfg.model} on {cfg.dataset} "
                          f"is {model_config.get('task')}")


def _prepare_canaries(cfg: RunConfig, options: AuditOptions, rng: np.random.Generator, scratch: Path):
    """The gradient canaries, and the canary node's data file: its partition plus the member record canaries."""
    from fedsafe.client.data import load_partition
    from fedsafe.client.training import poisson_schedule
    from fedsafe.server.app import global_model_setup
    from fedsafe.simulations.run import partition_scheme

    initial, model_config, _ = global_model_setup(cfg)
    shapes = {name: array.numpy().shape for name, array in initial.items() if array.numpy().dtype.kind == "f"}
    canaries = GradientCanaries.draw(shapes, options.canaries, cfg.max_grad_norm, cfg.dp, rng)
    own = load_partition(cfg.dataset, CANARY_NODE, partition_scheme(cfg, options.num_nodes))
    # own.x[:]: the canary node's whole share, also from an image folder read lazily (an audit rewrites it)
    x_own = np.asarray(own.x[:], dtype=np.float32).reshape(len(own), -1)
    m = options.record_canaries
    # Out-of-distribution points with random labels: what a model must memorise to fit.
    records_x = (rng.standard_normal((m, x_own.shape[1])) * 3 * x_own.std() + x_own.mean()).astype(np.float32)
    records_y = rng.integers(0, int(model_config["num-classes"]), size=m)
    members = rng.random(m) < 0.5
    x = np.concatenate([x_own, records_x[members]]).reshape(-1, *own.x.shape[1:])
    y = np.concatenate([own.y, records_y[members].astype(own.y.dtype)])
    np.savez(scratch / "canary-node.npz", x=x, y=y)
    canaries.sample_rate, _ = poisson_schedule(len(y), cfg.batch_size)
    canaries.batch_size = cfg.batch_size
    return canaries, (records_x.reshape(m, *own.x.shape[1:]), records_y), members


class _AuditGrid(LocalGrid):
    """The in-process grid, keeping what the coordinator saw of the canary node: each round's update."""

    def __init__(self, client_app, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.canary_node = NODE_ID_BASE + CANARY_NODE
        self.deltas: list[dict[str, np.ndarray]] = []  # per round: its update less the other nodes' mean
        self.reported_epsilon = float("nan")  # the canary node's ledger, as its last reply said

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MessageType

        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages if m.metadata.message_type == MessageType.TRAIN}
        replies = super().send_and_receive(messages, timeout=timeout)
        updates = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in sent and not reply.has_error() and protocol.ARRAYS in reply.content:
                start, update = sent[node].content[protocol.ARRAYS], reply.content[protocol.ARRAYS]
                updates[node] = {k: update[k].numpy() - start[k].numpy() for k in update.keys()}
                if node == self.canary_node:
                    self.reported_epsilon = float(reply.content[protocol.METRICS].get(protocol.EPSILON, float("nan")))
        if self.canary_node in updates:
            others = [u for node, u in updates.items() if node != self.canary_node]
            # The other nodes' mean update: the drift the data alone causes on each coordinate, which the
            # coordinator can subtract from the canary node's (it sees every update).
            reference = ({k: np.mean([u[k] for u in others], axis=0) for k in updates[self.canary_node]}
                         if others else {})
            self.deltas.append({k: v - reference.get(k, 0.0) for k, v in updates[self.canary_node].items()})
        return replies


def _train_federation(cfg: RunConfig, options: AuditOptions, canaries: GradientCanaries, scratch: Path, progress):
    """The run: the real round loop, strategy and node handler, with throwaway ledgers; node 0 reads the
    canary data file and trains with the gradient canaries."""
    import logging

    from fedsafe.client.app import make_client_app
    from fedsafe.client.policy import DEFAULT_MAX_EPSILON, NodePolicy
    from fedsafe.server.app import run_server

    policy = NodePolicy(state_dir=str(scratch / "ledgers"), max_epsilon=cfg.epsilon if cfg.dp else DEFAULT_MAX_EPSILON,
                        delta=cfg.delta, allow_non_private=not cfg.dp, seed_noise=True)
    canary_policy = policy.with_overrides(data_path=str(scratch / "canary-node.npz"))

    def is_canary_node(context) -> bool:
        return int(context.node_config.get("partition-id", -1)) == CANARY_NODE

    def policy_source(context):
        return canary_policy if is_canary_node(context) else policy

    def canary_mod(msg, context, call_next):
        token = _ACTIVE.set(canaries if is_canary_node(context) else None)
        try:
            return call_next(msg, context)
        finally:
            _ACTIVE.reset(token)

    if not options.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    grid = _AuditGrid(make_client_app(policy_source=policy_source, extra_mods=[canary_mod]), options.num_nodes)
    with gradient_canary_hook():
        outcome = run_server(grid, cfg, progress)
    if not grid.deltas:
        raise AuditError("the canary node (partition 0) sent no update in any round; nothing to audit "
                         "(see its refusal above)")
    if canaries.inserted == 0 and canaries.members.any():
        raise AuditError("no gradient canary reached the canary node's optimizer: the audit's hook did not fire")
    final = {k: v.numpy() for k, v in outcome.arrays.items()}
    return grid.deltas, final, grid.reported_epsilon


def _record_scores(cfg: RunConfig, final: dict[str, np.ndarray], records) -> np.ndarray:
    """Black-box score per record canary: minus the final global model's loss on it."""
    import torch

    from fedsafe.models import DataSpec, build_model, parse_model_options, task_for
    from fedsafe.server.app import global_model_setup

    _, model_config, _ = global_model_setup(cfg)
    spec = DataSpec(input_shape=tuple(model_config["input-shape"]), num_classes=int(model_config["num-classes"]),
                    task=str(model_config.get("task", "classification")))
    model = build_model(cfg.model, spec, parse_model_options(cfg.model_options))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in final.items()}, strict=True)
    model.eval()
    task = task_for(spec.task, spec.num_classes)
    x, y = torch.as_tensor(records[0]), torch.as_tensor(records[1])
    with torch.no_grad():
        return -task.per_sample_loss(model(x), task.targets(x, y)).numpy()


def _write(report: AuditReport, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for g in (report.white_box, report.black_box):
        xs, ys = zip(*g.accuracy_curve)
        line, = ax.plot(xs, ys, marker=".", label=f"{g.kind} (m={g.canaries}): ε ≥ {g.epsilon_lower_bound:.2f}")
        ax.plot([g.guesses], [g.accuracy], marker="o", color=line.get_color())  # the guesses the bound uses
    if report.max_accuracy is not None:
        ax.axhline(report.max_accuracy, color="k", linestyle="--", linewidth=1,
                   label=f"allowed by ε={report.reported_epsilon:.2f}")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("guesses (k highest + k lowest scores)")
    ax.set_ylabel("guess accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot)
    plt.close(fig)
    summary = {**asdict(report), "max_accuracy": report.max_accuracy, "contradicted": report.contradicted}
    (plot.parent / "audit.json").write_text(json.dumps(summary, indent=2))
