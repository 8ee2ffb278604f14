import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedsafe.client.data import (
    DataError,
    PartitionScheme,
    load_dataset,
    load_file,
    load_partition,
    load_stored_partition,
    partition_indices,
    save_partitions,
)
from fedsafe.server.checkpoint import CheckpointError, RunState, load_checkpoint, save_checkpoint
from fedsafe.strategies import UpdateRejected, validate_update


def _digits():
    return load_dataset("digits").train


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 17])
@pytest.mark.parametrize("seed", [0, 11])
def test_partitions_cover_every_sample_exactly_once(kind, num_partitions, seed):
    data = _digits()
    parts = partition_indices(data, PartitionScheme(kind, num_partitions, alpha=0.3, seed=seed))
    assert len(parts) == num_partitions and all(len(p) > 0 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(data)))


def test_pathological_partitions_hold_k_classes_and_never_overlap():
    data = _digits()
    parts = partition_indices(data, PartitionScheme("pathological", 10, classes_per_node=2, seed=1))
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist()))  # no sample on two nodes
    assert all(len(np.unique(data.y[p])) <= 2 for p in parts)
    assert len(everything) == len(data)  # 10 nodes × 2 classes cover all 10 classes


def test_natural_partitions_follow_the_group_column(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["f1,f2,site,label"] + [f"{rng.normal():.3f},{rng.normal():.3f},{site},{i % 2}"
                                   for i, site in enumerate(["a", "b", "c"] * 20)]
    path = tmp_path / "sites.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_dataset(str(path), "site").train
    assert data.x.shape[1] == 2  # the group column is not a feature
    parts = partition_indices(data, PartitionScheme("natural", 3, partition_by="site"))
    assert sorted(len(set(data.groups[p])) for p in parts) == [1, 1, 1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(data)))
    with pytest.raises(DataError, match="3 groups"):
        partition_indices(data, PartitionScheme("natural", 4, partition_by="site"))


def test_a_node_loads_only_its_own_partition_lazily():
    scheme = PartitionScheme("iid", 10_000, seed=3)
    part = load_partition("synthetic", 9_999, scheme)
    everyone = partition_indices(load_dataset("synthetic").train, PartitionScheme("iid", 50, seed=3))
    assert 4 <= len(part) <= 5 and sum(map(len, everyone)) == len(load_dataset("synthetic").train)


@pytest.mark.parametrize("scheme", [PartitionScheme("iid", 7, seed=2), PartitionScheme("dirichlet", 9, alpha=0.3, seed=5),
                                    PartitionScheme("pathological", 10, classes_per_node=2, seed=1)])
def test_the_partition_store_gives_each_node_exactly_what_it_would_partition_itself(tmp_path, scheme):
    data = _digits()
    save_partitions(tmp_path / "store", "digits", data, scheme, partition_indices(data, scheme))
    for node in range(scheme.num_partitions):
        stored = load_stored_partition(str(tmp_path / "store"), "digits", node, scheme)
        own = load_partition("digits", node, scheme)
        assert np.array_equal(stored.x, own.x) and np.array_equal(stored.y, own.y)
        assert stored.x.dtype == own.x.dtype and stored.y.dtype == own.y.dtype and stored.spec == own.spec


def test_a_partition_store_for_other_data_or_another_split_is_not_used(tmp_path):
    data, scheme = _digits(), PartitionScheme("iid", 4, seed=0)
    save_partitions(tmp_path / "store", "digits", data, scheme, partition_indices(data, scheme))
    store = str(tmp_path / "store")
    assert load_stored_partition(store, "digits", 3, scheme) is not None
    assert load_stored_partition(store, "digits-seq", 3, scheme) is None
    assert load_stored_partition(store, "digits", 3, PartitionScheme("iid", 4, seed=1)) is None
    assert load_stored_partition(store, "digits", 3, PartitionScheme("iid", 5, seed=0)) is None
    assert load_stored_partition(str(tmp_path / "nowhere"), "digits", 0, scheme) is None


def test_a_rewritten_partition_store_is_read_anew(tmp_path):
    data, store = _digits(), tmp_path / "store"
    first, second = PartitionScheme("iid", 4, seed=0), PartitionScheme("iid", 4, seed=1)
    save_partitions(store, "digits", data, first, partition_indices(data, first))
    assert load_stored_partition(str(store), "digits", 2, first) is not None
    save_partitions(store, "digits", data, second, partition_indices(data, second))  # the next run, same out-dir
    assert load_stored_partition(str(store), "digits", 2, first) is None
    assert np.array_equal(load_stored_partition(str(store), "digits", 2, second).y, load_partition("digits", 2, second).y)


def test_iid_partitions_are_shuffled_even_when_labels_are_sorted():
    data = _digits()
    order = np.argsort(data.y, kind="stable")
    sorted_data = data.subset(order)
    for part in partition_indices(sorted_data, PartitionScheme("iid", 5)):
        assert len(np.unique(sorted_data.y[part])) == 10  # not a contiguous block of a few classes


@pytest.mark.parametrize("n, k", [(1347, 10), (1347, 7), (1347, 1347), (60, 13), (5, 1)])
def test_iid_shards_are_flwr_datasets_iid_partitions(n, k):
    """IidShards cuts the seeded order where flwr-datasets' IidPartitioner (Dataset.shard, contiguous) does:
    the same nodes hold the same records, as before the Hugging Face Dataset was skipped."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    data = _digits().subset(np.arange(n))
    scheme = PartitionScheme("iid", k, seed=42)
    reference = IidPartitioner(num_partitions=k)
    reference.dataset = Dataset.from_dict({"index": np.random.default_rng(42).permutation(n)})
    ours = partition_indices(data, scheme)
    assert len(ours) == k
    for i in range(k):
        assert np.array_equal(ours[i], np.asarray(reference.load_partition(i)["index"], dtype=np.int64))
        assert ours[i].dtype == np.int64


def test_dirichlet_skews_label_distributions():
    data = _digits()
    parts = partition_indices(data, PartitionScheme("dirichlet", 10, alpha=0.1))
    top_share = [np.bincount(data.y[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # IID would be ~0.1


@pytest.mark.parametrize(
    "scheme, message",
    [
        (dict(kind="iid", num_partitions=5000), "more nodes"),
        (dict(kind="zipf", num_partitions=3), "unknown partitioner"),
        (dict(kind="dirichlet", num_partitions=3, alpha=0.0), "alpha must be > 0"),
        (dict(kind="dirichlet", num_partitions=3, alpha=-1.0), "alpha must be > 0"),
        (dict(kind="iid", num_partitions=0), "at least 1"),
        (dict(kind="pathological", num_partitions=3, classes_per_node=11), "exceeds the 10 classes"),
        (dict(kind="natural", num_partitions=3), "group column"),
        (dict(kind="dirichlet", num_partitions=1000, alpha=0.05), "cannot divide this data over 1000 nodes.*raise alpha"),
    ],
)
def test_bad_partition_requests_are_named(scheme, message):
    with pytest.raises(DataError, match=message):
        partition_indices(_digits(), PartitionScheme(**scheme))


def test_user_files_load_and_bad_files_are_named(tmp_path):
    csv = tmp_path / "patients.csv"
    csv.write_text("age,bp,label\n50,120,1\n61,130,0\n45,110,1\n")
    data = load_file(csv)
    assert data.x.shape == (3, 2) and data.y.tolist() == [1, 0, 1] and data.spec.num_classes == 2
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 8, 8)), y=np.array([0, 1, 2, 1]))
    assert load_file(tmp_path / "d.npz").spec.input_shape == (1, 8, 8)
    with pytest.raises(DataError, match="not found"):
        load_file(tmp_path / "missing.csv")
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no label column"):
        load_file(tmp_path / "nolabel.csv")
    (tmp_path / "text.csv").write_text("a,label\nx,1\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_file(tmp_path / "text.csv")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def _arrays(**overrides):
    state = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    state.update(overrides)
    return ArrayRecord(state)


@pytest.mark.parametrize(
    "update, reason",
    [
        (_arrays(w=torch.full((3, 2), float("nan"))), "NaN"),
        (_arrays(w=torch.zeros(2, 3)), "shape"),
        (_arrays(w=torch.zeros(3, 2, dtype=torch.float64)), "dtype"),
        (ArrayRecord({"w": torch.zeros(3, 2)}), "keys differ"),
        (_arrays(w=torch.full((3, 2), 100.0)), "exceeds the bound"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(_arrays(), update, max_update_norm=10.0)


def test_good_update_passes():
    validate_update(_arrays(), _arrays(w=torch.ones(3, 2)), max_update_norm=10.0)


def test_checkpoint_round_trips_and_corruption_is_named(tmp_path):
    state = RunState(run_key="k", completed_round=3, model_state={"w": torch.arange(4.0)},
                     history=[{"round": 1}], config={"num-rounds": 5})
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded.completed_round == 3 and torch.equal(loaded.model_state["w"], torch.arange(4.0))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "elsewhere")


def test_virtual_nodes_read_their_share_from_the_drivers_store(tmp_path, monkeypatch):
    from fedsafe.client import data as client_data

    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=1, dataset="digits", model="mlp", epsilon=3.0)
    assert (cfg.out_path / "federation" / "manifest.json").exists()

    def no_partitioning(*_args):
        raise AssertionError("a virtual node partitioned the dataset itself")

    monkeypatch.setattr(client_data, "_cached_partitioner", no_partitioning)
    outcome = run(cfg, grid, strategy)
    assert outcome.history[-1]["replies"] == 3 and outcome.history[-1]["failures"] == 0


def test_the_partition_store_is_removed_when_the_run_ends(tmp_path):
    from fedsafe.server.config import RunConfig
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process

    cfg = RunConfig(num_rounds=1, dataset="digits", model="mlp", epsilon=3.0, out_dir=str(tmp_path / "run"))
    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=3))
    assert outcome.history[-1]["replies"] == 3
    assert (tmp_path / "run" / "partitions.csv").exists() and not (tmp_path / "run" / "federation").exists()
