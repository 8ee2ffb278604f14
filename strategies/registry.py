"""Flower's Message-API strategies by config name, with their parameters checked before a run starts.

Every strategy here is Flower's own implementation (`flwr.serverapp.strategy`); fedsafe only maps its
typed run-config keys onto the constructor arguments and refuses values a strategy cannot use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import MultiKrum

from fedsafe.settings import strategy_params


class StrategyError(ValueError):
    """An unknown strategy name, a parameter it does not take, or a value it cannot use."""


# The strategy parameters fedsafe knows, as run-config keys, with their defaults (declared with the run's
# other settings in fedsafe.settings). A value other than the default for a parameter the chosen strategy
# does not take is refused: it would silently do nothing.
PARAM_DEFAULTS: dict[str, Any] = strategy_params()


@dataclass(frozen=True)
class StrategySpec:
    name: str
    build: Callable[..., Any]  # (common kwargs, params) -> Flower strategy
    params: tuple[str, ...] = ()
    summary: str = ""
    sums_updates: bool = True  # aggregate is a (weighted) mean of the updates: works on a secure sum
    flower_defaults: dict[str, Any] = field(default_factory=dict)


def _server_lr(params: Mapping[str, Any], default: float) -> float:
    return float(params["server-lr"]) or default


def _fedavg(common, params):
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**common)


def _fedprox(common, params):
    from flwr.serverapp.strategy import FedProx

    return FedProx(**common, proximal_mu=float(params["proximal-mu"]))


def _fedadam(common, params):
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(**common, eta=_server_lr(params, 1e-1), beta_1=float(params["beta-1"]),
                   beta_2=float(params["beta-2"]), tau=float(params["tau"]))


def _fedyogi(common, params):
    from flwr.serverapp.strategy import FedYogi

    return FedYogi(**common, eta=_server_lr(params, 1e-2), beta_1=float(params["beta-1"]),
                   beta_2=float(params["beta-2"]), tau=float(params["tau"]))


def _fedadagrad(common, params):
    from flwr.serverapp.strategy import FedAdagrad

    return FedAdagrad(**common, eta=_server_lr(params, 1e-1), tau=float(params["tau"]))


def _fedavgm(common, params):
    from flwr.serverapp.strategy import FedAvgM

    return FedAvgM(**common, server_learning_rate=_server_lr(params, 1.0),
                   server_momentum=float(params["server-momentum"]))


def _fedmedian(common, params):
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**common)


def _fedtrimmedavg(common, params):
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**common, beta=float(params["trim-beta"]))


def _krum(common, params):
    from flwr.serverapp.strategy import Krum

    return Krum(**common, num_malicious_nodes=int(params["num-malicious"]))


def _multikrum(common, params):
    from flwr.serverapp.strategy import MultiKrum

    f, k = int(params["num-malicious"]), int(params["krum-selected"])
    if k:
        return MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=k)
    return MultiKrumNMinusF(**common, num_malicious_nodes=f)


def _bulyan(common, params):
    from flwr.serverapp.strategy import Bulyan

    return Bulyan(**common, num_malicious_nodes=int(params["num-malicious"]))


class MultiKrumNMinusF(MultiKrum):
    """Flower's MultiKrum, averaging the n − f best-scored of the n updates that arrived this round."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


_SPECS: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("fedavg", _fedavg, (), "weighted mean of the updates (McMahan et al. 2017)"),
        StrategySpec("fedprox", _fedprox, ("proximal-mu",), "FedAvg + proximal term in the nodes' loss"),
        StrategySpec("fedadam", _fedadam, ("server-lr", "beta-1", "beta-2", "tau"), "server-side Adam"),
        StrategySpec("fedyogi", _fedyogi, ("server-lr", "beta-1", "beta-2", "tau"), "server-side Yogi"),
        StrategySpec("fedadagrad", _fedadagrad, ("server-lr", "tau"), "server-side Adagrad"),
        StrategySpec("fedavgm", _fedavgm, ("server-lr", "server-momentum"), "FedAvg with server momentum"),
        StrategySpec("fedmedian", _fedmedian, (), "coordinate-wise median", sums_updates=False),
        StrategySpec("fedtrimmedavg", _fedtrimmedavg, ("trim-beta",), "coordinate-wise trimmed mean",
                     sums_updates=False),
        StrategySpec("krum", _krum, ("num-malicious",), "the update closest to its n−f−2 neighbours",
                     sums_updates=False),
        StrategySpec("multikrum", _multikrum, ("num-malicious", "krum-selected"),
                     "mean of the best Krum-scored updates", sums_updates=False),
        StrategySpec("bulyan", _bulyan, ("num-malicious",), "Multi-Krum selection, then trimmed median",
                     sums_updates=False),
    )
}


def strategy_names() -> list[str]:
    return list(_SPECS)


def strategy_spec(name: str) -> StrategySpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}") from None


def check_strategy(name: str, params: Mapping[str, Any] | None = None, sampled_nodes: int | None = None) -> None:
    """Raise StrategyError unless `name` exists, every parameter set away from its default is one the
    strategy takes, and every value is usable (with `sampled_nodes` replies per round, when known)."""
    spec = strategy_spec(name)
    params = {**PARAM_DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(PARAM_DEFAULTS))
    if unknown:
        raise StrategyError(f"unknown strategy parameters {unknown}; known: {sorted(PARAM_DEFAULTS)}")
    stray = [k for k in PARAM_DEFAULTS if k not in spec.params and params[k] != PARAM_DEFAULTS[k]]
    if stray:
        takes = ", ".join(spec.params) if spec.params else "no parameters"
        raise StrategyError(f"strategy {name!r} does not use {', '.join(stray)}; it takes: {takes}")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise StrategyError(f"{name}: {message}")

    need(params["proximal-mu"] >= 0, f"proximal-mu must be >= 0; got {params['proximal-mu']}")
    need(params["server-lr"] >= 0, f"server-lr must be > 0 (0: Flower's default); got {params['server-lr']}")
    need(0 <= params["server-momentum"] < 1, f"server-momentum must be in [0, 1); got {params['server-momentum']}")
    need(0 <= params["beta-1"] < 1, f"beta-1 must be in [0, 1); got {params['beta-1']}")
    need(0 <= params["beta-2"] < 1, f"beta-2 must be in [0, 1); got {params['beta-2']}")
    need(params["tau"] > 0, f"tau must be > 0; got {params['tau']}")
    need(0 <= params["trim-beta"] < 0.5, f"trim-beta must be in [0, 0.5); got {params['trim-beta']}")
    f = int(params["num-malicious"])
    need(f >= 0, f"num-malicious must be >= 0; got {f}")
    need(int(params["krum-selected"]) >= 0, f"krum-selected must be >= 0; got {params['krum-selected']}")
    if sampled_nodes is None:
        return
    n = sampled_nodes
    if name in ("krum", "multikrum"):
        need(n >= 2 * f + 3, f"Krum needs n >= 2f + 3 replies per round; n={n}, f={f}")
        need(int(params["krum-selected"]) <= n, f"krum-selected={params['krum-selected']} exceeds n={n}")
    if name == "bulyan":
        need(n >= 4 * f + 3, f"Bulyan needs n >= 4f + 3 replies per round; n={n}, f={f}")
    if name == "fedtrimmedavg":
        need(int(params["trim-beta"] * n) < n - int(params["trim-beta"] * n),
             f"trim-beta={params['trim-beta']} leaves nothing to average over n={n}")
    if name == "fedmedian" or name == "fedtrimmedavg":
        need(n >= 1, "needs at least one node per round")


def build_strategy(
    name: str,
    *,
    fraction_train: float,
    min_train_nodes: int,
    min_available_nodes: int,
    params: Mapping[str, Any] | None = None,
):
    """A Flower strategy that samples `fraction_train` of the connected nodes each round.

    Federated evaluation on nodes is off: evaluating the global model on private data and
    returning the figures would leak it outside the DP guarantee; the server evaluates on held-out data.
    """
    check_strategy(name, params)
    spec = strategy_spec(name)
    common = dict(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_available_nodes,
    )
    return spec.build(common, {**PARAM_DEFAULTS, **(params or {})})
