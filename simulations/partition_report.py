"""What each simulated node holds: samples and label histogram per node, as CSV, a table and a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedsafe.client.data import ArrayDataset, PartitionScheme, partition_indices

MAX_PLOTTED_NODES = 100


def label_histograms(data: ArrayDataset, scheme: PartitionScheme, parts: list[np.ndarray] | None = None) -> np.ndarray:
    """(nodes × classes) sample counts; `parts`: the nodes' indices, if already computed."""
    parts = partition_indices(data, scheme) if parts is None else parts
    classes = max(data.spec.num_classes, 1)
    return np.stack([np.bincount(data.y[p], minlength=classes) for p in parts])


def write_partition_report(data: ArrayDataset, scheme: PartitionScheme, directory: Path,
                           parts: list[np.ndarray] | None = None) -> np.ndarray:
    """Write `partitions.csv` and `partitions.png` under `directory`; return the histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_histograms(data, scheme, parts)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "partitions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["node", "samples", *[f"label_{c}" for c in range(counts.shape[1])]])
        for node, row in enumerate(counts):
            writer.writerow([node, int(row.sum()), *map(int, row)])

    shown = counts[:MAX_PLOTTED_NODES]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.15 * len(shown)), 4))
    bottom = np.zeros(len(shown))
    cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    for label in range(counts.shape[1]):
        ax.bar(np.arange(len(shown)), shown[:, label], bottom=bottom, color=cmap(label % cmap.N),
               label=str(label), width=0.9)
        bottom += shown[:, label]
    title = f"{scheme.kind} partition over {scheme.num_partitions} nodes"
    if scheme.kind == "dirichlet":
        title += f" (α={scheme.alpha:g})"
    if len(counts) > MAX_PLOTTED_NODES:
        title += f" — first {MAX_PLOTTED_NODES} shown"
    ax.set_title(title)
    ax.set_xlabel("node")
    ax.set_ylabel("samples")
    if counts.shape[1] <= 20:
        ax.legend(title="label", ncol=2, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(directory / "partitions.png", dpi=110)
    plt.close(fig)
    return counts


def print_partition_table(counts: np.ndarray, limit: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"samples per node and label ({len(counts)} nodes)")
    table.add_column("node", justify="right")
    table.add_column("samples", justify="right")
    for label in range(counts.shape[1]):
        table.add_column(str(label), justify="right")
    for node, row in enumerate(counts[:limit]):
        table.add_row(str(node), str(int(row.sum())), *[str(int(v)) for v in row])
    console = Console()
    console.print(table)
    if len(counts) > limit:
        sizes = counts.sum(axis=1)
        console.print(f"… {len(counts) - limit} more nodes; samples per node min {sizes.min()}, "
                      f"median {int(np.median(sizes))}, max {sizes.max()}")
