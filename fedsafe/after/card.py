"""The model card of a finished run: MODEL_CARD.md and its JSON twin, model_card.json.

What it records: the task, the model family and size; the data by name only (a built-in data set's
name, or the file name the run was configured with — never a record of it); the nodes and rounds; the
aggregation strategy; the privacy record; the held-out metrics with 95 % confidence intervals.

The privacy record, per node: ε, δ, σ (noise multiplier) and sampling rate q as the node reported them
to the coordinator (metrics.json: each reply carries its ledger's figures, in deployments and simulations
alike), and, where the nodes' ledgers are on this disk (a simulation keeps them in <run>/ledgers), each
ledger's own figures for this run — σ, q, DP-SGD steps, ε of the run's spend and of all spend on that
data — recomputed from the ledger by the run's accountant. A deployed coordinator never sees the
ledgers; its card says so and gives what the nodes reported.

Confidence intervals are computed from the model's predictions on the coordinator's held-out data:
Wilson's score interval for accuracy (a proportion), a seeded percentile bootstrap for the others.
Computing them costs no ε: that data is the coordinator's, not a node's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .run import FinishedRun, RunDirError, open_run, read_metrics, run_config

CARD_MARKDOWN = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000

DP_DOES_NOT_COVER = [
    "Groups of records: (ε, δ) bounds what one record changes. A person with k records in a node's data is "
    "protected at roughly k·ε; one record per person gives per-person protection.",
    "Whether a site took part: record-level DP hides a node's individual records, not that the node joined "
    "or what its data is like as a whole, unless client-level DP was on (see above).",
    "What the data say as a whole: the model is meant to learn population patterns, and it does; DP does not "
    "hide facts true of many records.",
    "The coordinator's held-out data: the evaluation, the metrics below, explanations and this card use it "
    "without DP (it is the coordinator's own data, not the nodes').",
    "Other runs: ε here is per run and per node; a node's ledger adds up all runs on its data, and tuning by "
    "repeated runs spends ε on every run.",
    "Without SecAgg the coordinator sees each node's (noised, clipped) update; that is covered by the node's ε, "
    "but nothing more is hidden from it.",
]


def card_paths(directory: str | Path) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / CARD_MARKDOWN, directory / CARD_JSON


# ---- confidence intervals ---------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes/n."""
    from scipy.stats import norm

    if n == 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def bootstrap_interval(statistic, arrays: tuple[np.ndarray, ...], confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of statistic(*arrays) over records (seeded: the card is reproducible).
    Resamples on which the statistic is undefined (e.g. AUROC of one class) are skipped."""
    return _percentile_interval(_resampled(lambda idx: statistic(*(a[idx] for a in arrays)), len(arrays[0]),
                                           resamples, seed), confidence)


def macro_f1_interval(y: np.ndarray, predicted: np.ndarray, confidence: float = CONFIDENCE,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of macro F1 over records (seeded: the card is reproducible), drawn as each
    resample's confusion counts. Macro F1 depends on the records only through their (true, predicted)
    counts, and n records drawn uniformly with replacement fall into the cells with Multinomial(n, cell
    count / n) counts: the bootstrap distribution of `bootstrap_interval(macro_f1, (y, predicted))`, at k²
    numbers a resample instead of n (12,000 held-out records: 0.28 s before, a few ms now)."""
    if len(y) == 0:
        return (math.nan, math.nan)
    classes = np.union1d(y, predicted)
    k = len(classes)
    cells = np.bincount(np.searchsorted(classes, y) * k + np.searchsorted(classes, predicted), minlength=k * k)
    counts = np.random.default_rng(seed).multinomial(len(y), cells / len(y), size=resamples)
    return _percentile_interval(list(_macro_f1_of_confusions(counts.reshape(resamples, k, k))), confidence)


def _macro_f1_of_confusions(confusions: np.ndarray) -> np.ndarray:
    """Macro F1 of each confusion matrix in `confusions` (resamples × true class × predicted class), over the
    classes present in its row or column, as macro_f1 counts them."""
    tp = np.diagonal(confusions, axis1=1, axis2=2).astype(float)
    true_count, predicted_count = confusions.sum(axis=2), confusions.sum(axis=1)
    present = (true_count + predicted_count) > 0
    denominator = 2 * tp + (predicted_count - tp) + (true_count - tp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def _resampled(value_of, n: int, resamples: int, seed: int) -> list[float]:
    """value_of(idx) for each of `resamples` seeded draws of n record indices with replacement; draws on which
    it is undefined (ValueError) or not finite are left out."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        try:
            value = value_of(idx)
        except ValueError:
            continue
        if math.isfinite(value):
            values.append(value)
    return values


def _percentile_interval(values: list[float], confidence: float) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def _interval(value: float, bounds: tuple[float, float], method: str, n: int) -> dict[str, Any]:
    return {"value": float(value), "low": bounds[0], "high": bounds[1], "method": method, "n": int(n)}


# Fast forms of the metrics for the bootstrap's 1000 resamples (sklearn's checks cost ~35 ms a call); each
# equals sklearn's (tests/test_after_training.py), which gives the point values.


def macro_f1(y: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in y or predicted (sklearn's average="macro")."""
    # Per-class counts in three bincounts (not three passes per class).
    if _class_indices(y) and _class_indices(predicted):  # labels 0..k-1 index the counts themselves
        size = int(max(y.max(initial=0), predicted.max(initial=0))) + 1
        true_class, predicted_class = y, predicted
    else:
        classes = np.union1d(y, predicted)
        size = len(classes)
        true_class, predicted_class = np.searchsorted(classes, y), np.searchsorted(classes, predicted)
    tp = np.bincount(true_class[predicted == y], minlength=size)
    true_count = np.bincount(true_class, minlength=size)
    predicted_count = np.bincount(predicted_class, minlength=size)
    present = (true_count + predicted_count) > 0  # the classes in y or predicted, in ascending order
    tp = tp[present].astype(float)
    fp = predicted_count[present] - tp
    fn = true_count[present] - tp
    denominator = 2 * tp + fp + fn
    return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)))


def _class_indices(labels: np.ndarray) -> bool:
    return np.issubdtype(labels.dtype, np.integer) and labels.min(initial=0) >= 0


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC by the Mann-Whitney rank sum (ties share ranks); ValueError with one class only."""
    from scipy.stats import rankdata

    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0:
        raise ValueError("r2 needs targets that vary")
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total


def mse(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean((y - predicted) ** 2))


def held_out_metrics(run: FinishedRun) -> dict[str, dict[str, Any]]:
    """The headline metrics of `run`'s model on the coordinator's held-out data, each with a 95 % interval."""
    import torch
    from sklearn.metrics import f1_score, r2_score, roc_auc_score

    from fedsafe.models import anomaly_scores

    if run.spec.task == "generation":
        final = run.document.get("summary", {}).get("final", {})
        return {k: {"value": v, "low": None, "high": None, "method": "as evaluated by the run (no interval: one "
                    "score of 1000 seeded samples)", "n": None} for k, v in final.items()}
    x, y, outliers = run.held_out()
    boot = "bootstrap percentile"
    if run.spec.task == "reconstruction":
        normal = y == 0 if outliers else np.ones(len(x), dtype=bool)
        scores = anomaly_scores(run.model, x)
        result = {"mse": _interval(scores[normal].mean(), bootstrap_interval(np.mean, (scores[normal],)), boot,
                                   normal.sum())}
        if outliers and (~normal).any():
            flags = (~normal).astype(int)
            result["anomaly_auroc"] = _interval(roc_auc_score(flags, scores), bootstrap_interval(auroc, (flags, scores)),
                                                boot, len(x))
        return result
    with torch.no_grad():
        outputs = run.model(torch.from_numpy(x)).numpy()
    if run.spec.task == "regression":
        predicted = outputs.reshape(len(x), -1)[:, 0] if outputs.ndim > 1 else outputs
        target = y.reshape(len(y), -1)[:, 0].astype(np.float64)
        return {
            "r2": _interval(r2_score(target, predicted), bootstrap_interval(r2, (target, predicted)), boot, len(x)),
            "mse": _interval(mse(target, predicted), bootstrap_interval(mse, (target, predicted)), boot, len(x)),
        }
    predicted = outputs.argmax(axis=1)
    correct = int((predicted == y).sum())
    result = {
        "accuracy": _interval(correct / len(y), wilson_interval(correct, len(y)), "Wilson score", len(y)),
        "f1": _interval(f1_score(y, predicted, average="macro", zero_division=0),
                        macro_f1_interval(y, predicted), boot, len(y)),
    }
    if outputs.shape[1] == 2 and len(np.unique(y)) == 2:
        probs = torch.softmax(torch.from_numpy(outputs), dim=1).numpy()[:, 1]
        result["auroc"] = _interval(roc_auc_score(y, probs), bootstrap_interval(auroc, (y, probs)), boot, len(y))
    return result


# ---- the privacy record -----------------------------------------------------------------------


def reported_epsilon(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each node's cumulative ε as it last reported it (metrics.json's per-round node_epsilon)."""
    latest: dict[str, float] = {}
    for entry in history:
        latest.update({str(k): float(v) for k, v in entry.get("node_epsilon", {}).items()})
    return latest


def reported_noise(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each node's σ and sampling rate q as it last reported them (metrics.json's per-round node_noise)."""
    latest: dict[str, dict[str, float]] = {}
    for entry in history:
        latest.update({str(k): dict(v) for k, v in entry.get("node_noise", {}).items()})
    return latest


def run_key_of(directory: Path) -> str | None:
    from fedsafe.server.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(directory, restore_rng=False).run_key
    except CheckpointError:
        return None


def ledger_records(ledger_dir: Path, run_key: str | None, delta: float, accountant: str) -> list[dict[str, Any]]:
    """This run's spend in every ledger under `ledger_dir`, as that ledger's own figures say."""
    from fedsafe.client.accounting import epsilon
    from fedsafe.client.identity import NodeIdentity
    from fedsafe.client.ledger import PrivacyLedger, audit_file

    records = []
    identity = NodeIdentity(ledger_dir)
    for path in sorted(ledger_dir.glob("*.json")):
        # Each file read and audited once (hash chain, entries, views), as PrivacyLedger.open audits it, for
        # the data key the file names.
        state, problems = audit_file(path, None, identity)
        if problems:
            records.append({"ledger": path.name, "error": f"unreadable: privacy ledger {path} {problems[0]}"})
            continue
        ledger = PrivacyLedger(path, state["data_key"], identity, state)
        runs = ledger.state_dict()["runs"]
        keys = [run_key] if run_key in runs else ([] if run_key else list(runs))
        history = ledger.history
        for key in keys:
            plan = ledger.run_plan(key)
            spend = [history[r["entry"]] for r in ledger.rounds_of(key)]
            records.append({
                "data": ledger.data_key, "run": key, "rounds": len(spend),
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "steps": sum(steps for _, _, steps in spend),
                "epsilon_run": epsilon(spend, delta, accountant) if spend else 0.0,
                "epsilon_all_runs_on_this_data": ledger.epsilon(delta, accountant),
                "delta": delta,
            })
    return records


def privacy_record(directory: Path, document: dict[str, Any], cfg, ledger_dir: Path | None,
                   run_key: str | None = None) -> dict[str, Any]:
    history = document.get("rounds", [])
    summary = document.get("summary", {})
    reported = reported_epsilon(history)
    noise = reported_noise(history)
    names = summary.get("node_names", {})  # {id: the name the coordinator registered it under}
    record: dict[str, Any] = {
        "record_level_dp": bool(cfg.dp),
        "accountant": cfg.accountant,
        "delta": cfg.delta,
        "epsilon_budget_per_node": cfg.epsilon if cfg.dp else None,
        "clipping_norm": cfg.max_grad_norm,
        "expected_batch_size": cfg.batch_size,
        "local_epochs": cfg.local_epochs,
        "nodes_reported": {node: {"epsilon": eps, "delta": cfg.delta,
                                  "noise_multiplier": noise.get(node, {}).get("noise_multiplier"),
                                  "sample_rate": noise.get(node, {}).get("sample_rate"),
                                  **({"name": names[node]} if node in names else {})}
                           for node, eps in sorted(reported.items())},
        "epsilon_max_over_nodes": max(reported.values()) if reported else None,
        "secagg": bool(cfg.secagg),
        "client_level_dp": cfg.client_dp,
        "client_level_epsilon": summary.get("client_level_epsilon"),
        "client_level_delta": cfg.client_level_delta if cfg.client_dp != "off" else None,
        "dp_does_not_cover": DP_DOES_NOT_COVER,
    }
    if cfg.client_dp != "off":
        record["client_noise_multiplier"] = cfg.client_noise_multiplier
        record["client_clipping_norm"] = cfg.client_clipping_norm
    ledger_dir = ledger_dir if ledger_dir is not None else directory / "ledgers"
    if ledger_dir.is_dir() and any(ledger_dir.glob("*.json")):
        record["ledgers"] = ledger_records(ledger_dir, run_key or run_key_of(directory), cfg.delta, cfg.accountant)
        record["source"] = f"the nodes' ledgers in {ledger_dir} (simulation) and the nodes' reports"
    else:
        record["ledgers"] = []
        record["source"] = ("the nodes' reports to the coordinator (ε, δ, σ and q from each node's ledger); the "
                            "ledgers themselves (`fedsafe ledger` on the node) the coordinator never sees")
    return record


# ---- the card ---------------------------------------------------------------------------------


def _data_description(cfg) -> dict[str, Any]:
    from fedsafe.client.data import is_builtin

    if is_builtin(cfg.dataset):
        training = f"built-in data set {cfg.dataset!r}, split across the nodes ({cfg.partitioner})"
    elif cfg.dataset:
        training = f"the nodes' own data, declared as {Path(cfg.dataset).name!r} (no record leaves a node)"
    else:
        training = "the nodes' own data (no record leaves a node)"
    held_out = (f"the coordinator's file {Path(cfg.eval_path).name!r}" if cfg.eval_path
                else f"the test split of {cfg.dataset!r}" if is_builtin(cfg.dataset) else "none")
    return {"training": training, "held_out": held_out, "partitioner": cfg.partitioner}


def build_model_card(directory: str | Path, ledger_dir: str | Path | None = None,
                     run_key: str | None = None) -> dict[str, Any]:
    """The card of the run in `directory` as a JSON-ready dict. `run_key`: the key its checkpoint holds, where
    the caller has it (the coordinator, which wrote it), so the checkpoint is not read back for it."""
    directory = Path(directory).expanduser()
    document = read_metrics(directory)
    cfg = run_config(document)
    card: dict[str, Any] = {
        "run": str(directory),
        "task": None,
        "model": {"family": cfg.model, "options": cfg.model_options},
        "data": _data_description(cfg),
        "federation": {
            "nodes": len(reported_epsilon(document.get("rounds", []))) or document.get("summary", {}).get("nodes_seen"),
            "rounds_completed": sum(1 for h in document.get("rounds", []) if h.get("round", 0) > 0),
            "rounds_planned": cfg.num_rounds,
            "strategy": cfg.strategy,
            "fraction_sampled_per_round": cfg.fraction_train,
            "stop_reason": document.get("summary", {}).get("stop_reason"),
        },
        "privacy": privacy_record(directory, document, cfg, Path(ledger_dir) if ledger_dir else None, run_key),
    }
    try:
        run = open_run(directory)
    except RunDirError as err:
        card["metrics"] = {"error": str(err)}
        return card
    parameters = sum(p.numel() for p in run.model.parameters())
    card["task"] = run.spec.task
    card["model"].update({"parameters": int(parameters), "input_shape": list(run.spec.input_shape),
                          "outputs": int(run.spec.num_classes)})
    try:
        card["metrics"] = held_out_metrics(run)
        card["metrics_note"] = (f"on the coordinator's held-out data ({card['data']['held_out']}), "
                                f"{int(CONFIDENCE * 100)} % intervals; no ε spent")
    except RunDirError as err:
        card["metrics"] = {"error": str(err)}
    return card


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_markdown(card: dict[str, Any]) -> str:
    p, f, m = card["privacy"], card["federation"], card["model"]
    lines = [
        f"# Model card: {m['family']} ({card['task'] or 'unknown task'})", "",
        f"Run: `{card['run']}`", "",
        "## Model", "",
        f"- Family: {m['family']}" + (f" (options: {m['options']})" if m.get("options") else ""),
        f"- Parameters: {_number(m.get('parameters'))}; input per record: {m.get('input_shape')}; outputs: {_number(m.get('outputs'))}",
        "", "## Data", "",
        f"- Training: {card['data']['training']}",
        f"- Held-out evaluation: {card['data']['held_out']}",
        "", "## Federation", "",
        f"- Nodes: {_number(f['nodes'])}; rounds: {f['rounds_completed']} of {f['rounds_planned']} planned",
        f"- Strategy: {f['strategy']}; fraction of nodes sampled per round: {f['fraction_sampled_per_round']:g}",
    ]
    if f.get("stop_reason"):
        lines.append(f"- Stopped early: {f['stop_reason']}")
    lines += ["", "## Privacy", ""]
    if p["record_level_dp"]:
        lines += [
            f"- Record-level DP-SGD on every node: budget ε ≤ {_number(p['epsilon_budget_per_node'])} per node, "
            f"δ = {p['delta']:g}, accountant {p['accountant']}",
            f"- Per-sample clipping norm C = {p['clipping_norm']:g}; expected batch size {p['expected_batch_size']}, "
            f"{p['local_epochs']} local epoch(s) per round",
            f"- Largest ε reported by a node: {_number(p['epsilon_max_over_nodes'])}",
        ]
    else:
        lines.append("- **No differential privacy**: this model was trained without DP (a baseline). "
                     "It may reveal individual training records.")
    lines += [
        f"- Secure aggregation (SecAgg+): {'on' if p['secagg'] else 'off'}",
        f"- Client-level DP: {p['client_level_dp']}" + (
            f" (ε = {_number(p['client_level_epsilon'])}, δ = {_number(p['client_level_delta'])}, "
            f"σ = {_number(p.get('client_noise_multiplier'))}, clipping {_number(p.get('client_clipping_norm'))})"
            if p["client_level_dp"] != "off" else ""),
        f"- Source of the figures: {p['source']}", "",
    ]
    if p["nodes_reported"]:
        lines += ["| node (as the coordinator knows it) | ε reported | δ | σ | sampling rate q |", "|---|---|---|---|---|"]
        lines += [f"| {v['name'] + f' ({node})' if 'name' in v else node} | {_number(v['epsilon'])} | {v['delta']:g} "
                  f"| {_number(v.get('noise_multiplier'))} | {_number(v.get('sample_rate'))} |"
                  for node, v in p["nodes_reported"].items()]
        lines.append("")
    if p["ledgers"]:
        lines += ["| node's data (ledger) | σ | sampling rate q | steps | rounds | ε this run | ε all runs on this data |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["ledgers"]:
            if "error" in r:
                lines.append(f"| {r['ledger']} | {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['data']} | {_number(r['noise_multiplier'])} | {_number(r['sample_rate'])} | {r['steps']} "
                         f"| {r['rounds']} | {_number(r['epsilon_run'])} | {_number(r['epsilon_all_runs_on_this_data'])} |")
        lines.append("")
    lines += ["### What differential privacy does not cover here", ""]
    lines += [f"- {item}" for item in p["dp_does_not_cover"]]
    lines += ["", "## Held-out metrics", ""]
    metrics = card.get("metrics", {})
    if "error" in metrics:
        lines.append(f"Not available: {metrics['error']}")
    else:
        lines.append(card.get("metrics_note", ""))
        lines += ["", "| metric | value | 95 % interval | method | records |", "|---|---|---|---|---|"]
        for name, v in metrics.items():
            interval = "–" if v.get("low") is None else f"[{_number(v['low'])}, {_number(v['high'])}]"
            lines.append(f"| {name} | {_number(v['value'])} | {interval} | {v['method']} | {_number(v.get('n'))} |")
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, ledger_dir: str | Path | None = None,
                     run_key: str | None = None) -> tuple[Path, Path]:
    """Write MODEL_CARD.md and model_card.json into the run directory `directory`."""
    from fedsafe.client.files import atomic_write
    from fedsafe.server.results import _json_safe

    card = _json_safe(build_model_card(directory, ledger_dir, run_key))
    markdown, document = card_paths(Path(directory).expanduser())
    text = json.dumps(card, indent=1)  # one write, not one per token as json.dump makes
    with atomic_write(document) as handle:
        handle.write(text)
    with atomic_write(markdown) as handle:
        handle.write(render_markdown(card))
    return markdown, document


def write_card_at_end_of_run(directory: str | Path, run_key: str | None = None) -> None:
    """The coordinator's call when a run ends: the card is written, or a warning says why not; a card
    that cannot be written never fails the finished run (`fedsafe card RUN` writes it later). `run_key`: the
    key of the run's checkpoint (None where it wrote none)."""
    import logging

    try:
        write_model_card(directory, run_key=run_key)
    except Exception as err:  # noqa: BLE001 - the run's results are already safe on disk
        logging.getLogger("fedsafe.server").warning(
            "model card not written (%s: %s); write it later with `fedsafe card %s`", type(err).__name__, err, directory)
