"""What each simulated node holds: samples and label histogram per node, as CSV, a table and a PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the figure's helper process draws without PyTorch (fedsafe.models)
    from fedsafe.client.data import ArrayDataset, PartitionScheme

MAX_PLOTTED_NODES = 100


TARGET_BINS = 5  # continuous targets (regression) are counted in this many quantile bins


def _continuous(data: ArrayDataset) -> bool:
    return not np.issubdtype(data.y.dtype, np.integer)


def _target_edges(data: ArrayDataset) -> np.ndarray:
    """Quantile bin edges of a continuous target over the whole training split (inner edges only)."""
    return np.unique(np.quantile(data.y, np.linspace(0, 1, TARGET_BINS + 1)[1:-1]))


def histogram_columns(data: ArrayDataset) -> list[str]:
    """What each histogram column counts: a class label, or a range of a continuous target."""
    if not _continuous(data):
        return [str(c) for c in range(max(data.spec.num_classes, int(data.y.max(initial=0)) + 1, 1))]
    bounds = [f"{e:.2g}" for e in _target_edges(data)]
    return [f"<{bounds[0]}", *[f"{a}..{b}" for a, b in zip(bounds, bounds[1:])], f">={bounds[-1]}"] if bounds \
        else ["all"]


def label_histograms(data: ArrayDataset, scheme: PartitionScheme, parts: list[np.ndarray] | None = None) -> np.ndarray:
    """(nodes × columns) sample counts, per class label or, for a continuous target, per quantile bin
    (histogram_columns); `parts`: the nodes' indices, if already computed."""
    from fedsafe.client.data import partition_indices

    parts = partition_indices(data, scheme) if parts is None else parts
    columns = len(histogram_columns(data))
    column = np.digitize(data.y, _target_edges(data)) if _continuous(data) else data.y
    return np.stack([np.bincount(column[p], minlength=columns) for p in parts])


def write_partition_report(data: ArrayDataset, scheme: PartitionScheme, directory: Path,
                           parts: list[np.ndarray] | None = None) -> np.ndarray:
    """Write `partitions.csv` and `partitions.png` under `directory` (the figure drawn now, or by the run's
    plot helper, fedsafe.server.plots); return the histograms."""
    from fedsafe.server.plots import draw

    counts = label_histograms(data, scheme, parts)
    directory.mkdir(parents=True, exist_ok=True)
    columns = histogram_columns(data)
    with (directory / "partitions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        prefix = "target_" if _continuous(data) else "label_"
        writer.writerow(["node", "samples", *[prefix + c for c in columns]])
        for node, row in enumerate(counts):
            writer.writerow([node, int(row.sum()), *map(int, row)])
    title = f"{scheme.kind} partition over {scheme.num_partitions} nodes"
    if scheme.kind == "dirichlet":
        title += f" (α={scheme.alpha:g})"
    if len(counts) > MAX_PLOTTED_NODES:
        title += f" — first {MAX_PLOTTED_NODES} shown"
    draw("partitions", str(directory), counts[:MAX_PLOTTED_NODES].tolist(), columns, title,
         "target" if _continuous(data) else "label")
    return counts


def draw_partitions(directory: str, shown: list[list[int]], columns: list[str], title: str, legend: str) -> None:
    """`partitions.png`: each shown node's samples, stacked by label (or target range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.asarray(shown, dtype=np.int64).reshape(len(shown), len(columns))
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.15 * len(shown)), 4))
    bottom = np.zeros(len(shown))
    cmap = plt.get_cmap("tab10" if len(columns) <= 10 else "tab20")
    for label, name in enumerate(columns):
        ax.bar(np.arange(len(shown)), shown[:, label], bottom=bottom, color=cmap(label % cmap.N),
               label=name, width=0.9)
        bottom += shown[:, label]
    ax.set_title(title)
    ax.set_xlabel("node")
    ax.set_ylabel("samples")
    if len(columns) <= 20:
        ax.legend(title=legend, ncol=2, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(Path(directory) / "partitions.png", dpi=110)
    plt.close(fig)


def print_partition_table(counts: np.ndarray, columns: list[str] | None = None, limit: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"samples per node and label or target range ({len(counts)} nodes)")
    table.add_column("node", justify="right")
    table.add_column("samples", justify="right")
    for name in columns or [str(c) for c in range(counts.shape[1])]:
        table.add_column(name, justify="right")
    for node, row in enumerate(counts[:limit]):
        table.add_row(str(node), str(int(row.sum())), *[str(int(v)) for v in row])
    console = Console()
    console.print(table)
    if len(counts) > limit:
        sizes = counts.sum(axis=1)
        console.print(f"… {len(counts) - limit} more nodes; samples per node min {sizes.min()}, "
                      f"median {int(np.median(sizes))}, max {sizes.max()}")
