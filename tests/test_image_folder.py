"""Your own images: a folder with one sub-folder per class, read lazily (an image is opened when a batch draws
it), numbered alike on every node, sampled and accounted exactly as in-memory data, and learnt under DP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fedsafe.client.data import (
    ArrayDataset, DataError, PartitionScheme, load_dataset, load_file, load_partition, partition_indices,
    record_hashes, records_digest, schema_path,
)
from fedsafe.client.image_folder import ImageFolderDataset

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SCHEMA = {"classes": ["left", "right"], "size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.5]}


def image_folder(root, per_class: int = 30, classes=("left", "right"), size: int = 12, schema=SCHEMA, seed: int = 0):
    """Grey PNGs: class k is bright on one half (left/right), with noise. Returns `root`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size))
            if name == "left":
                pixels[:, : size // 2] += 160
            elif name == "right":
                pixels[:, size // 2:] += 160
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(root / name / f"{i:04d}.png")
    if schema is not None:
        schema_path(root).write_text(json.dumps(schema))
    return root


def test_an_image_folder_is_read_lazily_resized_and_normalised(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "scans")
    data = load_file(folder)
    assert isinstance(data, ImageFolderDataset)
    assert len(data) == 60 and data.spec.input_shape == (1, 8, 8) and data.spec.num_classes == 2
    assert data.y.tolist() == [0] * 30 + [1] * 30
    assert not any(isinstance(v, np.ndarray) and v.size > len(data) for v in vars(data).values())  # no pixels held
    # Read when asked for: a file changed after loading is what the next access sees.
    Image.fromarray(np.full((12, 12), 255, np.uint8), mode="L").save(folder / "left" / "0000.png")
    x, y = data[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and int(y) == 0
    assert torch.allclose(x, torch.ones(1, 8, 8))  # (1.0 - 0.5) / 0.5
    assert data.x[[0, 1]].shape == (2, 1, 8, 8)


def test_classes_are_numbered_by_the_schema_and_an_unknown_class_is_refused(tmp_path):
    # A node holding only 'right' images still numbers them 1, as the node holding both does.
    only_right = load_file(image_folder(tmp_path / "a", classes=("right",)))
    assert set(only_right.y.tolist()) == {1} and only_right.spec.num_classes == 2
    # Without a schema: the sub-folders' names, sorted.
    unsorted = load_file(image_folder(tmp_path / "b", per_class=2, classes=("right", "left"), schema=None))
    assert unsorted.classes == ("left", "right") and unsorted.y.tolist() == [0, 0, 1, 1]
    assert unsorted.spec.input_shape == (1, 12, 12)  # the first image's size
    with pytest.raises(DataError, match=r"class folder\(s\) \['middle'\] are not among the classes \['left', 'right'\]"):
        load_file(image_folder(tmp_path / "c", per_class=2, classes=("left", "middle")))
    (tmp_path / "c" / "middle").rename(tmp_path / "c" / "right")
    (tmp_path / "c" / "right" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not a PNG/JPEG image"):
        load_file(tmp_path / "c")
    (tmp_path / "c" / "right" / "notes.txt").unlink()
    schema_path(tmp_path / "c").write_text(json.dumps({**SCHEMA, "std": [0]}))
    with pytest.raises(DataError, match="std > 0"):
        load_file(tmp_path / "c")
    schema_path(tmp_path / "c").write_text(json.dumps({**SCHEMA, "classes": ["left", "../right"]}))
    with pytest.raises(DataError, match="distinct sub-folder names"):  # a class is a sub-folder, nothing above it
        load_file(tmp_path / "c")
    schema_path(tmp_path / "c").write_text(json.dumps({"classes": ["left"], "size": [8, 8]}))
    with pytest.raises(DataError, match="size and channels together"):
        load_file(tmp_path / "c")


def test_a_node_whose_folder_counts_other_classes_than_the_run_refuses(tmp_path):
    from types import SimpleNamespace

    from fedsafe.client.app import _spec_from_request

    data = load_file(image_folder(tmp_path / "n", per_class=2, classes=("left", "right", "up"), schema=None))
    request = SimpleNamespace(input_shape=(1, 12, 12), num_classes=2, task="classification")  # what it reads
    with pytest.raises(DataError, match=r"has 3 classes \['left', 'right', 'up'\]; the run's model has 2"):
        _spec_from_request(request, data)


def test_the_same_images_are_the_same_records_whatever_the_copy_or_schema(tmp_path):
    from PIL import Image

    data = load_file(image_folder(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    schema_path(tmp_path / "copy").write_text(json.dumps({**SCHEMA, "size": [12, 12], "mean": [0.0], "std": [1.0]}))
    copy = load_file(tmp_path / "copy")
    assert records_digest(copy) == records_digest(data)
    np.testing.assert_array_equal(record_hashes(copy), record_hashes(data))
    assert len(record_hashes(data)) == 60
    Image.fromarray(np.zeros((12, 12), np.uint8), mode="L").save(tmp_path / "copy" / "left" / "0000.png")
    changed = load_file(tmp_path / "copy")
    assert records_digest(changed) != records_digest(data)
    assert len(np.intersect1d(record_hashes(changed), record_hashes(data))) == 59


def test_poisson_sampling_and_accounting_are_those_of_the_same_images_in_memory(tmp_path):
    """Same records, same seed: the lazy folder and its in-memory copy draw the same batches (q = 1/ceil(n/B)),
    take the same DP-SGD steps, reach the same weights, and the spend gives the same ε as Opacus' accountant."""
    from opacus.accountants import RDPAccountant

    from fedsafe.client.accounting import epsilon
    from fedsafe.client.training import TrainSettings, poisson_schedule, train
    from fedsafe.models import build_model, task_for

    lazy = load_file(image_folder(tmp_path / "imgs", per_class=25))
    in_memory = ArrayDataset(np.stack([lazy[i][0].numpy() for i in range(len(lazy))]), lazy.y, lazy.spec)
    settings = TrainSettings(local_epochs=2, batch_size=16, lr=0.1, noise_multiplier=1.1, max_grad_norm=1.0)
    task = task_for("classification", 2)
    outcomes, weights = [], []
    for data in (lazy, in_memory):
        torch.manual_seed(0)
        model = build_model("mlp", lazy.spec)
        outcomes.append(train(model, task, data, settings, torch.device("cpu"), seed=11))
        weights.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert outcomes[0].dp_spend == outcomes[1].dp_spend
    torch.testing.assert_close(weights[0], weights[1])
    q, batches = poisson_schedule(50, 16)
    assert q == 1 / 4 and outcomes[0].dp_spend == ((1.1, q, 2 * batches),)
    accountant = RDPAccountant()
    accountant.history = [(1.1, q, 2 * batches)]
    assert epsilon(list(outcomes[0].dp_spend), 1e-5, "rdp") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_a_simulation_partitions_the_folder_by_index_and_learns_under_dp(tmp_path):
    folder = image_folder(tmp_path / "imgs", per_class=60)
    split = load_dataset(str(folder))
    scheme = PartitionScheme("iid", 2, seed=0)
    parts = partition_indices(split.train, scheme)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(split.train)))
    share = load_partition(str(folder), 1, scheme)
    assert isinstance(share, ImageFolderDataset) and len(share) == len(parts[1])

    from tests.inprocess import assert_two_nodes_learn_images_under_dp

    assert_two_nodes_learn_images_under_dp(tmp_path, str(folder))


def test_an_unreadable_image_is_named_before_any_round_spends(tmp_path):
    """A damaged file is found by the record digest a node computes before it reserves ε (its ledger key)."""
    folder = image_folder(tmp_path / "imgs", per_class=3)
    (folder / "right" / "zz-damaged.png").write_bytes(b"\x89PNG not really")
    data = load_file(folder)
    with pytest.raises(DataError, match=r"zz-damaged.png: not a readable image \(UnidentifiedImageError\)"):
        records_digest(data)
    with pytest.raises(DataError, match="zz-damaged.png: not a readable image"):
        data[len(data) - 1]


def test_a_gans_score_on_an_image_folder_reads_a_bounded_draw_of_it(tmp_path, monkeypatch):
    """The coordinator scores a GAN against real records; from a folder read lazily it loads a seeded
    draw of at most GAN_SAMPLES images, never the whole folder."""
    from fedsafe.server import evaluation

    data = load_file(image_folder(tmp_path / "scans", per_class=30))
    loaded = []
    load = type(data.transform).load
    monkeypatch.setattr(type(data.transform), "load", lambda self, path: loaded.append(path) or load(self, path))
    real = evaluation._real_records(data.x, 25, seed=3)
    assert real.shape == (25, 1, 8, 8) and len(loaded) == 25 == len(set(loaded))
    assert np.array_equal(real, evaluation._real_records(data.x, 25, seed=3))  # the same draw each round
