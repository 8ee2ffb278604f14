"""Client-level DP on the server (DP-FedAvg): Flower's server-side clipping wrappers, a privacy
accountant, and the budget stop.

Each sampled node's whole update is clipped to norm C, the clipped updates are averaged with equal
weights over the nodes *sampled* (a fixed denominator), and Gaussian noise of std z·C/n is added to the
mean. That bounds what the released model says about any one node's participation, on top of (and
independent of) the sample-level DP-SGD each node runs on its own records.

- `fixed`: `DifferentialPrivacyServerSideFixedClipping` with Flower 1.41's `RdpAccountant`, which
  refuses (PrivacyBudgetExhausted) a round whose release would pass the configured client-level ε.
- `adaptive`: `DifferentialPrivacyServerSideAdaptiveClipping` (Andrew et al. 2019): C follows a noisy
  quantile of the update norms. Flower has no accountant for it; fedsafe composes the RDP of both
  Gaussian releases per round (the update, noise z_Δ·C/n, and the clipped-count query, noise σ_b,
  sensitivity 1) with Opacus' RDP analysis, and stops the run the same way.

Accounting is done without amplification by node sampling (Flower's `no-amplification` model, the only
one its fixed-clipping accountant accepts): Flower samples a fixed number of nodes without replacement,
for which the Poisson-subsampled RDP bound is not valid, and the sample is known to the server. With
`fraction-train = 1` (every node, every round) the bound is exact for the Gaussian mechanism.

Replies: fedsafe's loop hands over only valid replies (error replies and rejected updates are removed
before `aggregate_train`). Flower's wrappers would void a round on any error reply, and under the
accountant also on any shortfall; here a sampled node without a valid reply contributes a zero update
(one float32 ulp in one coordinate, so Flower's clipping never divides by a zero norm), so every round
averages exactly n clipped updates: the sensitivity the noise was calibrated for.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg, FedProx

from .wrapper import StrategyWrapper

UNIFORM_WEIGHT = "client-dp-weight"  # every sampled node weighs the same in the clipped mean


class RunStop(RuntimeError):
    """A strategy's reason to end the run cleanly before the next round."""


class _ExactSample:
    """Samples exactly `sample_size` nodes per round: the n that the DP noise is calibrated for."""

    sample_size: int

    def configure_train(self, server_round, arrays, config, grid):
        node_ids = list(grid.get_node_ids())
        if getattr(grid, "excluded", None) and len(node_ids) < self.sample_size:
            raise RunStop(
                f"client-level DP needs {self.sample_size} nodes per round; only {len(node_ids)} of the "
                f"connected nodes can afford another round"
            )
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if len(messages) > self.sample_size:
            messages = random.sample(messages, self.sample_size)
        return messages


class ExactSampleFedAvg(_ExactSample, FedAvg):
    def __init__(self, *, sample_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_size = sample_size


class ExactSampleFedProx(_ExactSample, FedProx):
    def __init__(self, *, sample_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_size = sample_size


def adaptive_count_stddev(noise_multiplier: float, num_sampled: int) -> float:
    """σ_b of the clipped-count query. Andrew et al. suggest n/20, which Flower cannot use when
    z ≥ 2σ_b (any z ≥ 0.5 with 5 nodes); fedsafe takes max(n/20, z), so z_Δ ≈ 1.15·z at worst."""
    return max(num_sampled / 20.0, noise_multiplier)


class AdaptiveClippingAccountant:
    """RDP of the adaptive-clipping rounds (Opacus' analysis, no sampling amplification)."""

    def __init__(self, update_noise: float, count_noise: float, delta: float, max_epsilon: float | None) -> None:
        self.update_noise, self.count_noise = update_noise, count_noise
        self.delta, self.max_epsilon = delta, max_epsilon
        self.releases = 0

    def epsilon(self, releases: int | None = None) -> float:
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        releases = self.releases if releases is None else releases
        if releases == 0:
            return 0.0
        orders = list(RDPAccountant.DEFAULT_ALPHAS)
        rdp = compute_rdp(q=1.0, noise_multiplier=self.update_noise, steps=releases, orders=orders) + compute_rdp(
            q=1.0, noise_multiplier=self.count_noise, steps=releases, orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=self.delta)
        return float(eps)

    def would_exceed(self) -> bool:
        return self.max_epsilon is not None and self.epsilon(self.releases + 1) > self.max_epsilon

    def state_dict(self) -> dict[str, Any]:
        return {"update_noise": self.update_noise, "count_noise": self.count_noise, "releases": self.releases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["update_noise"], state["count_noise"]) != (self.update_noise, self.count_noise):
            raise ValueError("the checkpoint's adaptive-clipping noise differs from this run's")
        self.releases = int(state["releases"])


def _flower_rdp_accountant(population: int, delta: float, max_epsilon: float | None):
    try:
        from flwr.supercore.privacy_accounting import (
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon,
        ))
    except ImportError as err:
        raise ImportError(f"client-dp=fixed accounts with Flower's RdpAccountant: {err}") from None


class ClientLevelDP(StrategyWrapper):
    """fedsafe's wrapper around Flower's server-side DP wrappers (see the module docstring)."""

    def __init__(
        self,
        inner: FedAvg,
        *,
        mode: str,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled: int,
        population: int,
        delta: float,
        max_epsilon: float | None = None,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
    ) -> None:
        from flwr.serverapp.strategy import (
            DifferentialPrivacyServerSideAdaptiveClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        self.mode, self.num_sampled, self.delta = mode, num_sampled, delta
        self.max_epsilon = max_epsilon or None
        self.requested_noise_multiplier = noise_multiplier
        if mode == "fixed":
            self.strategy = DifferentialPrivacyServerSideFixedClipping(
                inner, noise_multiplier, clipping_norm, num_sampled,
                accountant=_flower_rdp_accountant(population, delta, self.max_epsilon),
            )
            self.accountant = None
        elif mode == "adaptive":
            count_noise = adaptive_count_stddev(noise_multiplier, num_sampled)
            self.strategy = DifferentialPrivacyServerSideAdaptiveClipping(
                inner, noise_multiplier, num_sampled, initial_clipping_norm=clipping_norm,
                target_clipped_quantile=target_quantile, clip_norm_lr=clip_lr, clipped_count_stddev=count_noise,
            )
            self.accountant = AdaptiveClippingAccountant(
                self.strategy.noise_multiplier, self.strategy.clipped_count_stddev, delta, self.max_epsilon)
        else:
            raise ValueError(f"unknown client-dp mode {mode!r}; choose fixed or adaptive")
        self._sent: dict[int, Message] = {}
        self._report: dict[int, dict[str, Any]] = {}

    # ---- the accountant's view --------------------------------------------------------------
    def epsilon(self) -> float:
        if self.accountant is None:
            return float(self.strategy.privacy_spent().epsilon) if self.strategy.accountant.num_releases else 0.0
        return self.accountant.epsilon()

    def releases(self) -> int:
        return self.strategy.accountant.num_releases if self.accountant is None else self.accountant.releases

    # ---- Strategy ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        if self.accountant is not None and self.accountant.would_exceed():
            raise PrivacyBudgetExhausted(
                f"the next private release would exceed the client-level budget ε={self.max_epsilon:g} "
                f"(current ε={self.epsilon():.3f}, δ={self.delta:g}, {self.releases()} releases)"
            )
        self.current_arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {m.metadata.dst_node_id: m for m in messages}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = [r for r in replies if not r.has_error()]
        by_node = {r.metadata.src_node_id: r for r in replies if r.metadata.src_node_id in self._sent}
        uniform = []
        for node, sent in self._sent.items():
            arrays = by_node[node].content["arrays"] if node in by_node else _zero_update(self.current_arrays)
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({UNIFORM_WEIGHT: 1.0})})
            uniform.append(Message(content, reply_to=sent))
        clipping_norm = float(self.strategy.clipping_norm)
        with fresh_global_numpy_noise():
            arrays, _ = self.strategy.aggregate_train(server_round, uniform)
        if arrays is not None and self.accountant is not None:
            self.accountant.releases += 1
        self._report[server_round] = {
            "client_level_epsilon": self.epsilon(),
            "client_level_delta": self.delta,
            "client_dp": {
                "mode": self.mode, "noise_multiplier": self.requested_noise_multiplier,
                "clipping_norm": clipping_norm, "sampled": len(self._sent),
                "zero_updates_for_missing": len(self._sent) - len(by_node), "releases": self.releases(),
            },
        }
        return arrays, None  # nodes send no training loss (client/gate.py): nothing else to aggregate

    def round_report(self, server_round: int) -> dict[str, Any]:
        return self._report.pop(server_round, {"client_level_epsilon": self.epsilon(),
                                               "client_level_delta": self.delta})

    # ---- checkpoints ---------------------------------------------------------------------
    def fedsafe_state_dict(self) -> dict[str, Any]:
        return {"adaptive_accountant": self.accountant.state_dict() if self.accountant is not None else None}

    def fedsafe_load_state_dict(self, state: dict[str, Any]) -> None:
        if self.accountant is not None and state.get("adaptive_accountant") is not None:
            self.accountant.load_state_dict(state["adaptive_accountant"])


@contextlib.contextmanager
def fresh_global_numpy_noise() -> Iterator[None]:
    """Run the block with NumPy's global generator freshly seeded from the OS, then put its state back.

    Flower's server-side DP wrappers draw their noise (the model's, and adaptive clipping's count) from
    `np.random`'s global state, which anything in the process can set: a resumed coordinator restored it
    from its checkpoint, so a retried round drew the very noise of the interrupted attempt, and two
    releases with one noise draw cancel it in their difference. Fresh entropy for every release makes
    each draw independent whatever the global state was; the state outside the block is left as it was
    (so a seeded simulation stays reproducible everywhere but in this noise)."""
    saved = np.random.get_state()
    np.random.seed(None)  # OS entropy
    try:
        yield
    finally:
        np.random.set_state(saved)


def _zero_update(current: ArrayRecord) -> ArrayRecord:
    """The current model moved by one float32 ulp in one coordinate: a zero update that Flower's
    clipping (which divides by the update's norm) accepts. Data-independent, so privacy-neutral."""
    out, nudged = ArrayRecord(), False
    for key in current.keys():
        value = np.array(current[key].numpy(), copy=True)
        if not nudged and value.size and np.issubdtype(value.dtype, np.floating):
            flat = value.reshape(-1)
            flat[0] = np.nextafter(flat[0], np.inf, dtype=value.dtype)
            nudged = True
        out[key] = Array(value)
    return out


def build_client_dp(inner_name: str, common: dict[str, Any], params: dict[str, Any], *, mode: str,
                    noise_multiplier: float, clipping_norm: float, num_sampled: int, population: int,
                    delta: float, max_epsilon: float | None, target_quantile: float, clip_lr: float) -> ClientLevelDP:
    """Client-level DP around FedAvg or FedProx sampling exactly `num_sampled` nodes, equally weighted."""
    kwargs = {**common, "min_train_nodes": num_sampled, "weighted_by_key": UNIFORM_WEIGHT,
              "sample_size": num_sampled}
    if inner_name == "fedavg":
        inner = ExactSampleFedAvg(**kwargs)
    elif inner_name == "fedprox":
        inner = ExactSampleFedProx(**kwargs, proximal_mu=float(params["proximal-mu"]))
    else:
        raise ValueError(f"client-level DP needs fedavg or fedprox; got {inner_name!r}")
    if max_epsilon is not None and not math.isfinite(max_epsilon):
        max_epsilon = None
    return ClientLevelDP(inner, mode=mode, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                         num_sampled=num_sampled, population=population, delta=delta, max_epsilon=max_epsilon,
                         target_quantile=target_quantile, clip_lr=clip_lr)
