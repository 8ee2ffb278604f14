"""`fedsafe tune`: hyperparameter search in simulation, with the search itself charged to the privacy ledgers.

Every trial is a federated run on the nodes' data, and picking the best of K runs releases something that
depends on all K: the search costs the composition of every trial's spend, not one trial's ε. So all the
trials of a search charge one set of ledgers (one per virtual node, `<out>/ledgers`), in full, and the
reported cost of the search is what those ledgers compose to (RDP over every DP-SGD step of every trial;
no random-stopping discount is claimed). The best setting is the one with the highest central test
accuracy (the coordinator's held-out split: its own data, not the nodes').

The other path: tune on public proxy data (`proxy`: a built-in dataset or a data file shaped like the
private one), whose trials charge throwaway ledgers (`<out>/proxy-ledgers`) and nothing of the private
data's, then train once on the private data with the best setting: the private ledgers pay for that one
run alone. Whether the proxy data is public is the researcher's claim, not something fedsafe can check.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.plots import plots_in_background
from fedsafe.settings import RUN_SETTINGS, SettingError, by_key

from .run import SimulationOptions, simulate_in_process

TUNABLE = ("lr", "batch-size", "local-epochs", "local-steps", "num-rounds", "max-grad-norm", "momentum",
           "weight-decay", "server-lr", "server-momentum", "strategy", "proximal-mu")


@dataclass(frozen=True)
class TuneGrid:
    """Run settings (by run-config key) and the values to try for each; trials are their product."""

    values: dict[str, tuple[Any, ...]]

    @classmethod
    def parse(cls, specs: list[str]) -> TuneGrid:
        """From `key=v1,v2,...` words (ConfigError naming the word otherwise)."""
        settings, values = by_key(RUN_SETTINGS), {}
        for spec in specs:
            key, sep, listed = spec.partition("=")
            key = key.strip()
            if not sep or not listed.strip():
                raise ConfigError(f"--tune takes key=value,value,...; got {spec!r}")
            if key not in TUNABLE:
                raise ConfigError(f"--tune {key}: not a tunable setting; choose among {', '.join(TUNABLE)}")
            try:
                values[key] = tuple(settings[key].parse(v.strip()) for v in listed.split(",") if v.strip())
            except SettingError as err:
                raise ConfigError(f"--tune {err}") from None
        if not values:
            raise ConfigError("fedsafe tune needs at least one --tune key=value,value,...")
        return cls(values)

    def trials(self, base: RunConfig, out: Path) -> list[tuple[dict[str, Any], RunConfig]]:
        keys = list(self.values)
        trials = []
        for index, combo in enumerate(itertools.product(*(self.values[k] for k in keys)), start=1):
            setting = dict(zip(keys, combo, strict=True))
            trials.append((setting, with_setting(base, setting, out / f"trial-{index}")))
        return trials


def with_setting(base: RunConfig, setting: dict[str, Any], out_dir: Path) -> RunConfig:
    """`base` with `setting` (values by run-config key) applied, writing its results to `out_dir`."""
    settings = by_key(RUN_SETTINGS)
    return replace(base, **{settings[key].name: value for key, value in setting.items()}, out_dir=str(out_dir))


@dataclass
class TuneReport:
    trials: list[dict[str, Any]]  # setting, accuracy, the trial's own run ε (max over nodes)
    best: dict[str, Any]  # the best trial's setting
    best_accuracy: float | None
    charged_to_private: list[str]  # which runs the private ledgers paid for
    search_epsilon: dict[str, float]  # each node's private-ledger ε after the search, by data key
    delta: float
    proxy: str | None = None
    final: dict[str, Any] | None = None  # proxy path: the one private run with the best setting

    @property
    def search_epsilon_max(self) -> float:
        return max(self.search_epsilon.values()) if self.search_epsilon else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"trials": self.trials, "best": self.best, "best_accuracy": self.best_accuracy,
                "proxy": self.proxy, "final": self.final, "charged_to_private": self.charged_to_private,
                "search_epsilon": self.search_epsilon, "search_epsilon_max": self.search_epsilon_max,
                "delta": self.delta}


def tune(base: RunConfig, grid: TuneGrid, options: SimulationOptions, out: Path, proxy: str | None = None,
         search_epsilon: float | None = None, progress=print) -> TuneReport:
    """Run every trial of `grid` on `base` (on `proxy` data instead, when given, then the best once on the
    private data); the report's cost is what the private ledgers in `<out>/ledgers` compose to.

    `search_epsilon`: the nodes' lifetime cap for the whole search (default: the sum of the trials' grants,
    so that every trial can run; a smaller cap refuses the trials that would pass it)."""
    out.mkdir(parents=True, exist_ok=True)
    private_ledgers = out / "ledgers"
    trials = grid.trials(replace(base, dataset=proxy) if proxy else base, out / ("proxy" if proxy else "private"))
    cap = search_epsilon or (len(trials) * base.epsilon if base.dp else None)
    ledgers = out / "proxy-ledgers" if proxy else private_ledgers
    rows = []
    with plots_in_background():  # one figure-drawing helper for every trial, not one each
        for index, (setting, cfg) in enumerate(trials, start=1):
            row = _trial(setting, cfg, replace(options, ledger_dir=str(ledgers)), cap)
            rows.append(row)
            progress(f"[trial {index}/{len(trials)}{' on proxy data' if proxy else ''}] "
                     + ", ".join(f"{k}={v}" for k, v in setting.items()) + f": {_describe(row)}")
    ran = [r for r in rows if r["accuracy"] is not None]
    if not ran:
        raise ConfigError("no trial of the search produced a model: " + "; ".join(r["status"] for r in rows))
    best = max(ran, key=lambda r: r["accuracy"])
    report = TuneReport(trials=rows, best=best["setting"], best_accuracy=best["accuracy"],
                        charged_to_private=[] if proxy else [r["out_dir"] for r in rows],
                        search_epsilon={}, delta=base.delta, proxy=proxy)
    if proxy:
        final_cfg = with_setting(base, best["setting"], out / "final")
        report.final = _trial(best["setting"], final_cfg, replace(options, ledger_dir=str(private_ledgers)), None)
        report.charged_to_private = [report.final["out_dir"]]
        progress(f"[final run on the private data] {_describe(report.final)}")
    report.search_epsilon = ledger_epsilons(private_ledgers, base.delta, base.accountant)
    (out / "tune.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    return report


def _trial(setting: dict[str, Any], cfg: RunConfig, options: SimulationOptions, cap: float | None) -> dict[str, Any]:
    from fedsafe.client.data import DataError

    try:
        outcome = simulate_in_process(cfg, options, progress=None, max_epsilon=cap)
    except (ConfigError, DataError) as err:
        return {"setting": setting, "status": f"cannot run: {' '.join(str(err).split())}", "accuracy": None,
                "epsilon_max": None, "out_dir": cfg.out_dir}
    final = [r for r in outcome.history if "aggregated" in r]
    accuracy = (final[-1].get("eval") or {}).get("accuracy") if final else None
    eps = [r["epsilon_max"] for r in final if r.get("epsilon_max") is not None]
    return {"setting": setting, "status": "ran", "accuracy": accuracy, "epsilon_max": max(eps) if eps else None,
            "out_dir": cfg.out_dir}


def _describe(row: dict[str, Any]) -> str:
    if row["accuracy"] is None:
        return row["status"]
    eps = "n/a" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}"
    return f"accuracy {row['accuracy']:.3f}, nodes' ε after it {eps}"


def ledger_epsilons(ledger_dir: Path, delta: float, accountant: str = "rdp") -> dict[str, float]:
    """Each ledger's ε in `ledger_dir` (by data key): what the private data has paid, all trials composed."""
    from fedsafe.client.ledger import audit_state_dir

    if not ledger_dir.exists():
        return {}
    audit = audit_state_dir(ledger_dir)
    if audit.problems:
        raise ConfigError(f"the search's ledgers do not verify: {audit.problems[0]}")
    return {ledger.data_key: ledger.epsilon(delta, accountant) for ledger in audit.ledgers}


def summary_lines(report: TuneReport) -> list[str]:
    """What `fedsafe tune` prints at the end: the best setting and what the search cost, said plainly."""
    best = ", ".join(f"{k}={v}" for k, v in report.best.items())
    lines = [f"best setting: {best} (test accuracy {report.best_accuracy:.3f}"
             + (" on the proxy data)" if report.proxy else ")")]
    cost = report.search_epsilon_max
    if report.proxy:
        final = report.final
        lines.append("final run on the private data with it: " + _describe(final))
        lines.append(f"privacy cost to the private data: ε={cost:.3f} (δ={report.delta:g}), the final run alone: "
                     f"the {len(report.trials)} trials ran on {report.proxy!r}, charged to throwaway ledgers, "
                     f"nothing to the private ones (that data must be public for this to hold)")
    else:
        lines.append(f"privacy cost of the whole search: ε={cost:.3f} (δ={report.delta:g}), max over the nodes' "
                     f"ledgers, every one of the {len(report.trials)} trials charged in full and composed "
                     f"(a single trial's ε understates what choosing the best of them reveals)")
    if not math.isfinite(cost):
        lines.append("(no DP: the search is not private)")
    return lines
