"""Data for nodes, the server's held-out evaluation and simulations: loaders and partitions.

Flower-free on purpose: the server's central evaluation and the simulation driver import it without
pulling in node logic. Built-in sets come from scikit-learn's bundled files, so nothing is downloaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.registry import DataSpec


class DataError(ValueError):
    """Data that cannot be used as asked: a missing file, a bad column, too few samples."""


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # float32, shaped (n, *spec.input_shape)
    y: np.ndarray  # int64 class labels
    spec: DataSpec

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices], self.spec)


@dataclass(frozen=True)
class DataSplit:
    train: ArrayDataset
    test: ArrayDataset


BUILTIN_DATASETS = ("breast-cancer", "digits")
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def _split(x: np.ndarray, y: np.ndarray, spec: DataSpec) -> DataSplit:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify
    )
    return DataSplit(ArrayDataset(x_train, y_train, spec), ArrayDataset(x_test, y_test, spec))


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS


@functools.cache
def load_dataset(name_or_path: str) -> DataSplit:
    """A built-in dataset by name, or a data file (.csv/.npz) split 75/25 into train and held-out test."""
    if is_builtin(name_or_path):
        return load_builtin(name_or_path)
    if Path(name_or_path).suffix in (".csv", ".npz") or Path(name_or_path).exists():
        data = load_file(name_or_path)
        if len(data) < 8:
            raise DataError(f"{name_or_path}: {len(data)} samples are too few to split into train and test")
        return _split(data.x, data.y, data.spec)
    raise DataError(
        f"unknown dataset {name_or_path!r}; built-in: {', '.join(BUILTIN_DATASETS)}, or a .csv/.npz file path"
    )


@functools.cache
def load_builtin(name: str) -> DataSplit:
    """A bundled dataset with a fixed stratified train/test split (the same on every machine)."""
    from sklearn import datasets as sk

    if name == "breast-cancer":
        raw = sk.load_breast_cancer()
        x = raw.data.astype(np.float64)
        # Log-scale then standardise with constants of the whole bundled set: the feature ranges are
        # treated as public metadata, the usual assumption of DP-SGD on tabular data.
        x = np.log1p(x - x.min(axis=0))
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
        spec = DataSpec(input_shape=(x.shape[1],), num_classes=2)
        return _split(x.astype(np.float32), raw.target.astype(np.int64), spec)
    if name == "digits":
        raw = sk.load_digits()
        x = (raw.images / 16.0).astype(np.float32)[:, None, :, :]
        spec = DataSpec(input_shape=(1, 8, 8), num_classes=10)
        return _split(x, raw.target.astype(np.int64), spec)
    raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}, or a file path")


def load_file(path: str | Path, label_column: str = "label") -> ArrayDataset:
    """A node's own data: `.npz` (arrays `x`, `y`) or `.csv` (numeric columns and a label column)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path}: an .npz data file needs arrays 'x' and 'y'; found {list(arrays)}")
            x, y = arrays["x"].astype(np.float32), arrays["y"]
    elif path.suffix == ".csv":
        import csv

        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or label_column not in reader.fieldnames:
                raise DataError(f"{path}: no label column {label_column!r} in the CSV header")
            features = [name for name in reader.fieldnames if name != label_column]
            rows = list(reader)
        try:
            x = np.array([[float(row[f]) for f in features] for row in rows], dtype=np.float32)
            y = np.array([row[label_column] for row in rows])
        except ValueError as err:
            raise DataError(f"{path}: non-numeric feature value ({err})") from None
    else:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .npz or .csv")
    if len(x) == 0:
        raise DataError(f"{path}: the file holds no samples")
    try:
        labels = np.asarray(y).astype(np.float64)
    except ValueError:
        raise DataError(f"{path}: labels must be class numbers 0..K-1") from None
    if not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise DataError(f"{path}: labels must be class numbers 0..K-1; found {np.unique(y)[:10]}")
    # Every node numbers classes the same way, so K is taken from the largest label seen here; the
    # coordinator's model says the true K and the node checks its labels fit.
    spec = DataSpec(input_shape=tuple(x.shape[1:]), num_classes=int(labels.max()) + 1)
    return ArrayDataset(x, labels.astype(np.int64), spec)


PARTITIONERS = ("iid", "dirichlet")


def partition_indices(
    labels: np.ndarray, num_partitions: int, partitioner: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices over `num_partitions` nodes with flwr-datasets' partitioners.

    Every sample lands in exactly one partition. The data is shuffled first because flwr-datasets'
    IidPartitioner takes contiguous shards, which on label-sorted data would not be IID.
    """
    if num_partitions < 1:
        raise DataError(f"number of partitions must be at least 1; got {num_partitions}")
    if num_partitions > len(labels):
        raise DataError(
            f"more nodes ({num_partitions}) than training samples ({len(labels)}): "
            "every node needs at least one sample"
        )
    if partitioner not in PARTITIONERS:
        raise DataError(f"unknown partitioner {partitioner!r}; choose one of: {', '.join(PARTITIONERS)}")
    if partitioner == "dirichlet" and not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0; got {alpha}")

    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"index": order, "label": labels[order]})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=True,
            seed=seed,
        )
    part.dataset = table
    return [np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]


@functools.lru_cache(maxsize=8)
def _cached_partitions(
    dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    split = load_dataset(dataset)
    return tuple(partition_indices(split.train.y, num_partitions, partitioner, alpha, seed))


def load_partition(
    dataset: str, partition_id: int, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> ArrayDataset:
    """One simulated node's share of a dataset's training split."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition id {partition_id} outside 0..{num_partitions - 1}")
    indices = _cached_partitions(dataset, num_partitions, partitioner, float(alpha), int(seed))
    return load_dataset(dataset).train.subset(indices[partition_id])
