"""Data for nodes, the server's held-out evaluation and simulations: loaders and partitions.

Flower-free on purpose: the server's central evaluation and the simulation driver import it without
pulling in node logic. Built-in sets come from scikit-learn's bundled files, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fedsafe.models.registry import DataSpec

from .data_error import DataError
from .hf_images import has_image_column, is_hf_dataset_dir, open_hf_dataset, read_hf_images
from .image_folder import ImageFolderDataset, is_image_folder, load_image_folder


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # float32, shaped (n, *spec.input_shape)
    y: np.ndarray  # int64 class labels; float32 targets for regression; 0/1 outlier flags for anomaly sets
    spec: DataSpec
    groups: np.ndarray | None = None  # a natural partition key per sample (site, branch, patient group)
    # Images decoded from a dataset: each record's digest of its class and decoded pixels (what the ledger
    # keys on, image_folder.pixel_digest), so the same images under another schema are the same records.
    record_digests: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        def part(values):
            return None if values is None else values[indices]

        return ArrayDataset(self.x[indices], self.y[indices], self.spec, part(self.groups), part(self.record_digests))


@dataclass(frozen=True)
class DataSplit:
    train: ArrayDataset
    test: ArrayDataset
    # True: test.y flags outliers (1) among normal records (0), which the server scores by
    # reconstruction error (anomaly AUROC); train holds normal records only.
    outliers: bool = False


BUILTIN_DATASETS = ("breast-cancer", "digits", "digits-seq", "digits-anomaly", "diabetes", "synthetic")
TEST_FRACTION = 0.25
SPLIT_SEED = 0
# digits-anomaly: nodes hold the other nine digits; the held-out outliers are all the 4s.
ANOMALY_OUTLIER_DIGIT = 4


def _split(data: ArrayDataset) -> DataSplit:
    from sklearn.model_selection import train_test_split

    stratify = None
    if np.issubdtype(data.y.dtype, np.integer):
        counts = np.bincount(data.y)
        stratify = data.y if counts[counts > 0].min() >= 2 else None
    train_idx, test_idx = train_test_split(
        np.arange(len(data)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify
    )
    return DataSplit(data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx)))


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS


# Built-in views that hold the very records of another set, split and partitioned alike: a node's
# ledger must charge them to the same data, or two names would give the same records two budgets.
SAME_RECORDS = {"digits-seq": "digits"}


def records_of(dataset: str) -> str:
    """The name under which a simulated node's ledger accounts for `dataset`'s records."""
    return SAME_RECORDS.get(dataset, dataset)


def _record_rows(data: ArrayDataset | ImageFolderDataset) -> np.ndarray:
    """Each record as bytes, one row per record: its features (float32) and target (float64), flattened —
    the same whatever file or view they came from (CSV spacing and number formatting, .csv or .npz).
    An image's record is the SHA-256 of its class and decoded pixels (`record_digests`: an image folder's, or
    a Hugging Face image dataset's), so that digests and hashes never need all of a folder's images in memory
    and do not change with the schema's size or normalisation."""
    if data.record_digests is not None:
        return data.record_digests
    n = len(data)
    # Contiguous first: a table reader may hand over column-major (Fortran-ordered) arrays, whose rows
    # cannot be viewed as bytes.
    features = np.ascontiguousarray(data.x, dtype="<f4").reshape(n, -1)
    targets = np.ascontiguousarray(data.y, dtype="<f8").reshape(n, -1)
    return np.ascontiguousarray(np.concatenate([features.view(np.uint8).reshape(n, -1),
                                                targets.view(np.uint8).reshape(n, -1)], axis=1))


def records_digest(data: ArrayDataset | ImageFolderDataset) -> str:
    """SHA-256 of the set of records as loaded (`_record_rows`, sorted: row order does not count), so a
    copied, renamed or re-saved file has the digest of its records. What the privacy ledger of a node's own
    data is keyed on. One sort of the rows: milliseconds for thousands of records."""
    rows = _record_rows(data)
    ordered = np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())
    return hashlib.sha256(f"{len(rows)}x{rows.shape[1]}:".encode() + ordered.tobytes()).hexdigest()


def record_hashes(data: ArrayDataset | ImageFolderDataset) -> np.ndarray:
    """A 64-bit hash of each distinct record (sorted, unique): what the node keeps of the data each ledger
    protects, to notice a dataset that shares records with another ledger's (rows added to a copy, or
    dropped). Not cryptographic — the operator who would craft collisions could as well alter every record."""
    rows = _record_rows(data)
    words = np.pad(rows, ((0, 0), (0, -rows.shape[1] % 8))).view("<u8")
    digest = np.full(len(rows), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in words.T:  # FNV-1a over 8-byte words, then splitmix64's finaliser to mix the bits
            digest = (digest ^ column) * np.uint64(0x100000001B3)
        digest ^= digest >> np.uint64(30)
        digest *= np.uint64(0xBF58476D1CE4E5B9)
        digest ^= digest >> np.uint64(27)
        digest *= np.uint64(0x94D049BB133111EB)
        digest ^= digest >> np.uint64(31)
    return np.unique(digest)


@functools.cache
def load_dataset(name_or_path: str, group_column: str | None = None) -> DataSplit:
    """A built-in dataset by name, or a data file (.csv/.npz/.parquet) or folder (images, a saved Hugging Face
    dataset) split 75/25 into train and held-out test (an image folder's split is of its file list)."""
    if is_builtin(name_or_path):
        if group_column:
            raise DataError(f"built-in dataset {name_or_path!r} has no group column {group_column!r}")
        return load_builtin(name_or_path)
    if Path(name_or_path).suffix in (".npz", *TABLE_SUFFIXES) or Path(name_or_path).exists():
        data = load_file(name_or_path, group_column=group_column)
        if len(data) < 8:
            raise DataError(f"{name_or_path}: {len(data)} samples are too few to split into train and test")
        return _split(data)
    raise DataError(
        f"unknown dataset {name_or_path!r}; built-in: {', '.join(BUILTIN_DATASETS)}, or a .csv/.npz file path"
    )


SYNTHETIC_SAMPLES = 60_000


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
        return _split(ArrayDataset(x.astype(np.float32), raw.target.astype(np.int64), spec))
    if name == "digits":
        raw = sk.load_digits()
        x = (raw.images / 16.0).astype(np.float32)[:, None, :, :]
        spec = DataSpec(input_shape=(1, 8, 8), num_classes=10)
        return _split(ArrayDataset(x, raw.target.astype(np.int64), spec))
    if name == "digits-seq":
        # The same images and split, each read as 8 time steps (rows) of 8 features.
        split = load_builtin("digits")
        return DataSplit(fit_view(split.train, (8, 8)), fit_view(split.test, (8, 8)))
    if name == "digits-anomaly":
        # Anomaly detection: nodes train on normal records only (nine digits); the server scores
        # its held-out normal digits and the outlier digit (never trained on) by reconstruction error.
        split = load_builtin("digits")
        spec = DataSpec(input_shape=(1, 8, 8), num_classes=2, task="reconstruction")
        out = ANOMALY_OUTLIER_DIGIT
        train = split.train.subset(np.flatnonzero(split.train.y != out))
        normal_test = split.test.subset(np.flatnonzero(split.test.y != out))
        x_out = np.concatenate([split.train.x[split.train.y == out], split.test.x[split.test.y == out]])
        test_x = np.concatenate([normal_test.x, x_out])
        test_y = np.r_[np.zeros(len(normal_test), np.int64), np.ones(len(x_out), np.int64)]
        return DataSplit(
            ArrayDataset(train.x, np.zeros(len(train), np.int64), spec), ArrayDataset(test_x, test_y, spec), outliers=True
        )
    if name == "diabetes":
        # Regression: scikit-learn's bundled diabetes set (442 patients, 10 features, disease
        # progression after a year). Features and target standardised with constants of the whole
        # set (public metadata, as for breast-cancer); r2 = 0 is the mean predictor.
        raw = sk.load_diabetes()
        x = (raw.data - raw.data.mean(axis=0)) / raw.data.std(axis=0)
        y = (raw.target - raw.target.mean()) / raw.target.std()
        spec = DataSpec(input_shape=(x.shape[1],), num_classes=1, task="regression")
        return _split(ArrayDataset(x.astype(np.float32), y.astype(np.float32), spec))
    if name == "synthetic":
        # Generated, not downloaded: large enough for thousands of virtual nodes.
        x, y = sk.make_classification(
            n_samples=SYNTHETIC_SAMPLES, n_features=20, n_informative=10, n_classes=4,
            n_clusters_per_class=2, class_sep=1.5, random_state=0,
        )
        spec = DataSpec(input_shape=(20,), num_classes=4)
        return _split(ArrayDataset(x.astype(np.float32), y.astype(np.int64), spec))
    raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}, or a file path")


def fit_view(data: ArrayDataset, input_shape: tuple[int, ...]) -> ArrayDataset:
    """`data` with samples shaped `input_shape`: as they are, or, for the views models.resolve_spec
    makes, a one-channel image (1, H, W) read as (H, W) or back. DataError otherwise."""
    shape, want = tuple(data.x.shape[1:]), tuple(input_shape)
    if shape == want:
        return data
    if isinstance(data, ImageFolderDataset):
        raise DataError(f"images are shaped {shape} (channels, height, width); the model expects {want}: "
                        f"set size and channels in the folder's schema")
    if (shape[:1] == (1,) and shape[1:] == want) or (want[:1] == (1,) and want[1:] == shape):
        return replace(data, x=data.x.reshape(len(data.x), *want), spec=replace(data.spec, input_shape=want))
    raise DataError(f"samples are shaped {shape}; the model expects {want}")


def load_file(path: str | Path, label_column: str = "label",
              group_column: str | None = None) -> ArrayDataset | ImageFolderDataset:
    """A node's own data: `.npz` (arrays `x`, `y`, optional group array) or a table, `.csv` or `.parquet`
    (feature columns, a label column of class numbers 0..K-1, and optionally a group column for natural
    partitions; categorical or missing values need a schema file, see _load_table), a Hugging Face dataset
    (saved with save_to_disk, or a .parquet/.arrow file of one) of such columns or with an image column
    (decoded: fedsafe.client.hf_images), or a folder of images, one sub-folder per class, read lazily
    (fedsafe.client.image_folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not is_hf_dataset_dir(path) and is_image_folder(path):
        if group_column is not None:
            raise DataError(f"{path}: an image folder has no group column {group_column!r}")
        return load_image_folder(path, schema_path(path))
    images = None
    if has_image_column(path):
        images = read_hf_images(path, schema_path(path), label_column, group_column)
        x, y, groups = images.x, images.y, images.groups
    elif path.suffix == ".npz":
        with np.load(path) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path}: an .npz data file needs arrays 'x' and 'y'; found {list(arrays)}")
            x, y = arrays["x"].astype(np.float32), arrays["y"]
            if group_column is not None and group_column not in arrays:
                raise DataError(f"{path}: no group array {group_column!r}; found {list(arrays)}")
            groups = arrays[group_column] if group_column else None
    elif path.suffix in TABLE_SUFFIXES or is_hf_dataset_dir(path):
        x, y, groups = _load_table(path, label_column, group_column)
    else:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .npz, .csv, .parquet or .arrow")
    if len(x) == 0:
        raise DataError(f"{path}: the file holds no samples")
    try:
        labels = np.asarray(y).astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: labels must be class numbers 0..K-1") from None
    if not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise DataError(f"{path}: labels must be class numbers 0..K-1; found {np.unique(y)[:10]}")
    # Every node numbers classes the same way, so K is taken from the largest label seen here (or a Hugging
    # Face ClassLabel's names); the coordinator's model says the true K and the node checks its labels fit.
    num_classes = int(labels.max()) + 1
    if images is not None and images.num_classes is not None:
        if num_classes > images.num_classes:
            raise DataError(f"{path}: label {num_classes - 1} is not one of the {images.num_classes} classes "
                            f"the label column declares")
        num_classes = images.num_classes
    spec = DataSpec(input_shape=tuple(x.shape[1:]), num_classes=num_classes)
    return ArrayDataset(x, labels.astype(np.int64), spec, groups,
                        images.record_digests if images is not None else None)


TABLE_SUFFIXES = (".csv", ".parquet", ".arrow")  # .arrow: a Hugging Face dataset's file (save_to_disk's shard)
SCHEMA_SUFFIX = ".schema.json"  # beside a table: data.csv -> data.csv.schema.json


def schema_path(table: Path) -> Path:
    return table.with_name(table.name + SCHEMA_SUFFIX)


def _read_hf_dataset(path: Path):
    """A saved Hugging Face Dataset (a save_to_disk directory, an .arrow file) of table columns as a pandas
    table (its Arrow files, memory-mapped, then copied). One with an image column is read by hf_images."""
    dataset = open_hf_dataset(path)
    unusable = [name for name, feature in dataset.features.items()
                if type(feature).__name__ in ("Audio", "Video", "Sequence", "List", "LargeList")]
    if unusable:
        raise DataError(f"{path}: column(s) {unusable} are not table values (audio, video, lists)")
    return dataset.to_pandas()


def _load_table(path: Path, label_column: str, group_column: str | None):
    """A .csv or .parquet table, or a saved Hugging Face Dataset of table columns, as (x, y, groups).

    Without a schema file every feature column must be numeric and complete. With one
    (``<table>.schema.json``: ``{"numeric": {"age": {"fill": 40}, "income": {}}, "categorical":
    {"region": ["north", "south"]}}``) the features are exactly the declared columns, in the schema's
    order: a numeric column's missing values take its `fill` (default 0) and add a 0/1 column
    ``<name>_missing``; a categorical column becomes one 0/1 column per declared category plus one for
    a missing or undeclared value. The layout so depends on the schema alone, never on a node's own
    rows, so every node's model has the same inputs and their updates aggregate."""
    import pandas as pd

    try:
        if is_hf_dataset_dir(path) or path.suffix == ".arrow":
            table = _read_hf_dataset(path)
        else:
            table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or unreadable table
        raise DataError(f"{path}: cannot read the table: {type(err).__name__}") from None
    for what, column in (("label", label_column), ("group", group_column)):
        if column is not None and column not in table.columns:
            raise DataError(f"{path}: no {what} column {column!r} in the CSV header" if path.suffix == ".csv"
                            else f"{path}: no {what} column {column!r} in the table")
    groups = table[group_column].astype(str).to_numpy() if group_column else None
    y = table[label_column].to_numpy()
    features = table.drop(columns=[c for c in (label_column, group_column) if c])
    schema_file = schema_path(path)
    if schema_file.exists():
        x = _encode(features, _read_schema(schema_file), path)
    else:
        bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
        if bad:
            raise DataError(f"{path}: non-numeric feature value in column(s) {bad}; declare them as categorical "
                            f"in {schema_file.name}")
        missing = [c for c in features.columns if features[c].isna().any()]
        if missing:
            raise DataError(f"{path}: missing values in column(s) {missing}; declare them (with a fill) in "
                            f"{schema_file.name}")
        x = features.to_numpy(dtype=np.float32)
    if pd.isna(y).any():
        raise DataError(f"{path}: the label column {label_column!r} has missing values")
    return x, y, groups


def _read_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON schema ({type(err).__name__})") from None
    numeric, categorical = schema.get("numeric", {}), schema.get("categorical", {})
    if (set(schema) - {"numeric", "categorical"} or not isinstance(numeric, dict) or not isinstance(categorical, dict)
            or any(not isinstance(v, dict) or set(v) - {"fill"} for v in numeric.values())
            or any(not isinstance(v, list) or len(set(map(str, v))) != len(v) for v in categorical.values())):
        raise DataError(f"{path}: a schema is {{\"numeric\": {{column: {{\"fill\": number}}}}, "
                        f"\"categorical\": {{column: [distinct categories]}}}}")
    if set(numeric) & set(categorical):
        raise DataError(f"{path}: column(s) {sorted(set(numeric) & set(categorical))} declared twice")
    return {"numeric": numeric, "categorical": {k: [str(c) for c in v] for k, v in categorical.items()}}


def _encode(features, schema: dict, path: Path) -> np.ndarray:
    """The schema's columns, encoded as _load_table says."""
    import pandas as pd

    declared = [*schema["numeric"], *schema["categorical"]]
    undeclared = sorted(set(features.columns) - set(declared))
    absent = sorted(set(declared) - set(features.columns))
    if undeclared or absent:
        raise DataError(f"{path}: the table's columns differ from its schema: undeclared {undeclared}, absent {absent}")
    encoded = []
    for name, rule in schema["numeric"].items():
        values = pd.to_numeric(features[name], errors="coerce")
        if (values.isna() & features[name].notna()).any():
            raise DataError(f"{path}: non-numeric feature value in numeric column {name!r}")
        encoded += [values.fillna(float(rule.get("fill", 0.0))).to_numpy(np.float32),
                    values.isna().to_numpy(np.float32)]
    for name, categories in schema["categorical"].items():
        values = features[name].astype("string")
        encoded += [(values == c).fillna(False).to_numpy(np.float32) for c in categories]
        encoded.append((~values.isin(categories)).fillna(True).to_numpy(np.float32))  # missing or undeclared
    return np.stack(encoded, axis=1) if encoded else np.zeros((len(features), 0), np.float32)


PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")


@dataclass(frozen=True)
class PartitionScheme:
    """How a training split is divided over simulated nodes."""

    kind: str = "iid"
    num_partitions: int = 1
    alpha: float = 0.5  # Dirichlet concentration
    classes_per_node: int = 2  # pathological
    partition_by: str | None = None  # natural: the data's group column
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PARTITIONERS:
            raise DataError(f"unknown partitioner {self.kind!r}; choose one of: {', '.join(PARTITIONERS)}")
        if self.num_partitions < 1:
            raise DataError(f"number of partitions must be at least 1; got {self.num_partitions}")
        if self.kind == "dirichlet" and not self.alpha > 0:
            raise DataError(f"Dirichlet alpha must be > 0; got {self.alpha}")
        if self.kind == "pathological" and self.classes_per_node < 1:
            raise DataError(f"classes per node must be >= 1; got {self.classes_per_node}")
        if self.kind == "natural" and not self.partition_by:
            raise DataError("the natural partitioner needs the name of a group column (partition-by)")


def make_partitioner(data: ArrayDataset | ImageFolderDataset, scheme: PartitionScheme):
    """A flwr-datasets partitioner over `data`'s indices (IidShards for iid), ready to `load_partition(i)`.

    The rows are shuffled (seeded) first: flwr-datasets' IidPartitioner takes contiguous shards, which
    on label-sorted data would not be IID. Partitions are computed lazily, one node at a time where the
    partitioner allows, so 10,000 virtual nodes cost nothing until they are sampled.
    """
    n = len(data)
    if scheme.num_partitions > n:
        raise DataError(
            f"more nodes ({scheme.num_partitions}) than training samples ({n}): every node needs at least one sample"
        )
    if scheme.kind in ("dirichlet", "pathological") and not np.issubdtype(data.y.dtype, np.integer):
        raise DataError(f"the {scheme.kind} partitioner splits by class label; this data has real-valued "
                        "targets (regression): use the iid partitioner")
    order = np.random.default_rng(scheme.seed).permutation(n)
    if scheme.kind == "iid":
        return IidShards(order, scheme.num_partitions)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    columns = {"index": order, "label": data.y[order]}
    if scheme.kind == "natural":
        if data.groups is None:
            raise DataError(f"the data has no group column {scheme.partition_by!r} to partition by")
        columns["group"] = data.groups[order].astype(str)
        found = len(np.unique(columns["group"]))
        if found != scheme.num_partitions:
            raise DataError(f"the group column holds {found} groups; ask for that many nodes, not {scheme.num_partitions}")
    table = Dataset.from_dict(columns)
    if scheme.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=scheme.num_partitions, partition_by="label", alpha=scheme.alpha,
            min_partition_size=1, self_balancing=True, seed=scheme.seed,
        )
    elif scheme.kind == "pathological":
        num_classes = data.spec.num_classes
        if scheme.classes_per_node > num_classes:
            raise DataError(f"classes per node ({scheme.classes_per_node}) exceeds the {num_classes} classes")
        partitioner = PathologicalPartitioner(
            num_partitions=scheme.num_partitions, partition_by="label",
            num_classes_per_partition=scheme.classes_per_node, class_assignment_mode="first-deterministic",
            seed=scheme.seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = table
    return partitioner


class IidShards:
    """flwr-datasets' IidPartitioner, without building a Hugging Face Dataset to cut: node i holds the i-th of
    `num_partitions` contiguous shards of `order`, cut as its `Dataset.shard(contiguous=True)` cuts them
    (np.array_split: the first len % k shards one record longer). The same indices (a test compares them
    with flwr-datasets'); a simulation on the IID default then never imports `datasets` and
    flwr-datasets (with its plotting stack), about 1.5 s of CPU of a small run's start-up."""

    def __init__(self, order: np.ndarray, num_partitions: int) -> None:
        self._shards = np.array_split(order, num_partitions)

    def load_partition(self, partition_id: int) -> np.ndarray:
        return self._shards[partition_id]


def _indices(partitioner, partition_id: int, scheme: PartitionScheme) -> np.ndarray:
    if isinstance(partitioner, IidShards):
        return np.array(partitioner.load_partition(partition_id), dtype=np.int64)
    try:
        with warnings.catch_warnings():
            # Each redrawn Dirichlet sample warns, quoting every node's alpha: thousands of characters
            # for a large federation. A draw that succeeds needs no warning; one that fails is an error.
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            partition = partitioner.load_partition(partition_id)
            # The column as Arrow, straight to NumPy: reading it as a Python list costs ~15 ms a node.
            return np.array(partition.with_format("arrow")["index"].to_numpy(), dtype=np.int64)
    except ValueError as err:  # flwr-datasets gives up, e.g. Dirichlet draws that keep leaving a node empty
        hint = "; raise alpha or use fewer nodes" if scheme.kind == "dirichlet" else ""
        raise DataError(f"the {scheme.kind} partitioner cannot divide this data over {scheme.num_partitions} "
                        f"nodes: {err}{hint}") from None


def partition_indices(data: ArrayDataset | ImageFolderDataset, scheme: PartitionScheme) -> list[np.ndarray]:
    """Every node's sample indices (for reports and tests; nodes load only their own)."""
    partitioner = make_partitioner(data, scheme)
    return [_indices(partitioner, i, scheme) for i in range(scheme.num_partitions)]


@functools.lru_cache(maxsize=4)
def _cached_partitioner(dataset: str, scheme: PartitionScheme):
    return make_partitioner(load_dataset(dataset, scheme.partition_by).train, scheme)


STORE_MANIFEST = "manifest.json"


def save_partitions(directory: Path, dataset: str, data: ArrayDataset, scheme: PartitionScheme,
                    parts: list[np.ndarray]) -> None:
    """Write `data` (the training split of `dataset`) node after node as `scheme` divides it (`parts`,
    from partition_indices): x.npy and y.npy in partition order, offsets.npy, and a manifest naming the
    dataset and scheme, written last. Simulated nodes read their share with load_stored_partition,
    memory-mapped, instead of every process loading and partitioning the whole set."""
    from .files import atomic_write

    if not isinstance(data, ArrayDataset):
        return  # an image folder stays on disk: its nodes take their share of its file list (load_partition)
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    arrays = {"x.npy": data.x[order], "y.npy": data.y[order], "offsets.npy": offsets}
    for name, array in arrays.items():
        with atomic_write(directory / name, "wb", durable=False) as handle:
            np.save(handle, array)
    manifest = {"dataset": dataset, "scheme": asdict(scheme), "spec": asdict(data.spec)}
    with atomic_write(directory / STORE_MANIFEST, durable=False) as handle:
        json.dump(manifest, handle)


def _open_store(directory: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray] | None:
    try:  # the manifest is written last: its version names the store's (a rewritten store is reopened)
        version = (Path(directory) / STORE_MANIFEST).stat().st_mtime_ns
    except OSError:
        return None
    return _open_store_version(directory, version)


@functools.lru_cache(maxsize=4)
def _open_store_version(directory: str, _version: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        manifest = json.loads((Path(directory) / STORE_MANIFEST).read_text())
        x, y, offsets = (np.load(Path(directory) / name, mmap_mode="r") for name in ("x.npy", "y.npy", "offsets.npy"))
    except (OSError, ValueError):
        return None
    return manifest, x, y, offsets


def load_stored_partition(directory: str, dataset: str, partition_id: int,
                          scheme: PartitionScheme) -> ArrayDataset | None:
    """One simulated node's share from a save_partitions store; None when there is no store at
    `directory` or it was written for another dataset or partition scheme."""
    store = _open_store(str(directory))
    if store is None:
        return None
    manifest, x, y, offsets = store
    if manifest.get("dataset") != dataset or manifest.get("scheme") != asdict(scheme):
        return None
    if not 0 <= partition_id < scheme.num_partitions or len(offsets) != scheme.num_partitions + 1:
        return None
    start, end = int(offsets[partition_id]), int(offsets[partition_id + 1])
    spec = manifest["spec"]
    spec = DataSpec(input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"], task=spec["task"])
    return ArrayDataset(np.array(x[start:end]), np.array(y[start:end]), spec)


def prepare_partitions(dataset: str, scheme: PartitionScheme) -> None:
    """Load `dataset` and its partitioner into this process' cache ahead of the first load_partition."""
    _cached_partitioner(dataset, scheme)


def load_partition(dataset: str, partition_id: int, scheme: PartitionScheme) -> ArrayDataset:
    """One simulated node's share of a dataset's training split."""
    if not 0 <= partition_id < scheme.num_partitions:
        raise DataError(f"partition id {partition_id} outside 0..{scheme.num_partitions - 1}")
    indices = _indices(_cached_partitioner(dataset, scheme), partition_id, scheme)
    if len(indices) == 0:
        raise DataError(f"partition {partition_id} of {dataset} is empty under {scheme}")
    return load_dataset(dataset, scheme.partition_by).train.subset(indices)
