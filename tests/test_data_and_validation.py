import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from client.data import DataError, load_dataset, load_file, partition_indices
from server.checkpoint import CheckpointError, RunState, load_checkpoint, save_checkpoint
from strategies import UpdateRejected, validate_update


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 17])
def test_partitions_cover_every_sample_exactly_once(partitioner, num_partitions):
    labels = load_dataset("digits").train.y
    parts = partition_indices(labels, num_partitions, partitioner, alpha=0.3, seed=5)
    assert len(parts) == num_partitions and all(len(p) > 0 for p in parts)
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(labels)))


def test_iid_partitions_are_shuffled_even_when_labels_are_sorted():
    labels = np.sort(load_dataset("digits").train.y)
    parts = partition_indices(labels, 5, "iid", seed=0)
    for part in parts:  # every node sees (nearly) every class, not a contiguous block of a few
        assert len(np.unique(labels[part])) == 10


def test_dirichlet_skews_label_distributions():
    labels = load_dataset("digits").train.y
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # IID would be ~0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_partitions": 5000}, "more nodes"),
        ({"num_partitions": 3, "partitioner": "zipf"}, "unknown partitioner"),
        ({"num_partitions": 3, "partitioner": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_partition_requests_are_named(kwargs, message):
    with pytest.raises(DataError, match=message):
        partition_indices(load_dataset("digits").train.y, **kwargs)


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
