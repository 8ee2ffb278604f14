"""Hugging Face datasets with an image column (`datasets.Image()`), from local files only (save_to_disk, a
.parquet or .arrow file of one): decoded to (channels, height, width) inputs as the schema says, numbered by
the label column, partitioned, learnt under DP; what cannot be handled is one line naming it.

The datasets are made here from PNG-encoded PIL images; the expected inputs are computed from the pixels
written, not by fedsafe's decoder. Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsafe.client.data import (
    DataError, PartitionScheme, load_dataset, load_file, load_partition, partition_indices, record_hashes,
    records_digest, schema_path,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def pixels(count: int = 40, size: tuple[int, int] = (10, 10), colour: bool = False, seed: int = 0):
    """uint8 images, class k bright on one half (0: left, 1: right), with noise; and their labels."""
    rng = np.random.default_rng(seed)
    height, width = size
    images, labels = [], []
    for i in range(count):
        label = i % 2
        image = rng.integers(0, 90, (height, width, 3) if colour else (height, width))
        image[:, : width // 2] += 160 * (label == 0)
        image[:, width // 2:] += 160 * (label == 1)
        images.append(image.astype(np.uint8))
        labels.append(label)
    return images, labels


def hf_dataset(images, labels, class_names=("left", "right"), **extra):
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names)),
                         **{name: feature for name, (feature, _) in extra.items()}})
    return Dataset.from_dict({"image": [PILImage.fromarray(p) for p in images], "label": labels,
                              **{name: values for name, (_, values) in extra.items()}}, features=features)


def test_a_saved_parquet_or_arrow_image_dataset_loads_as_its_pixels(tmp_path):
    images, labels = pixels()
    dataset = hf_dataset(images, labels, class_names=("left", "right", "never-held"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "scans.parquet"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    expected = np.stack(images).astype(np.float32)[:, None] / 255.0

    loaded = [load_file(tmp_path / "saved"), load_file(tmp_path / "scans.parquet"), load_file(arrow)]
    for data in loaded:
        assert data.x.shape == (40, 1, 10, 10) and data.x.dtype == np.float32
        np.testing.assert_allclose(data.x, expected, atol=1e-6)
        assert data.y.tolist() == labels
        assert data.spec.input_shape == (1, 10, 10)
        assert data.spec.num_classes == 3  # the ClassLabel's names, not the labels this node happens to hold
    assert len({records_digest(data) for data in loaded}) == 1  # the same records, whatever the file

    colour, colour_labels = pixels(count=6, size=(6, 4), colour=True)
    hf_dataset(colour, colour_labels).save_to_disk(str(tmp_path / "rgb"))
    rgb = load_file(tmp_path / "rgb")
    assert rgb.x.shape == (6, 3, 6, 4)
    np.testing.assert_allclose(rgb.x, np.stack(colour).astype(np.float32).transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_the_schema_resizes_converts_and_normalises_and_the_records_stay_the_same(tmp_path):
    from PIL import Image as PILImage

    images, labels = pixels(count=8)
    mixed = images[:4] + [np.asarray(PILImage.fromarray(p).resize((14, 12))) for p in images[4:]]
    hf_dataset(mixed, labels).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"mixed: images of 2 sizes or kinds \(height×width×channels: 10×10×1, "
                                        r"12×14×1\) and no size to bring them to: set \"size\" and \"channels\" "
                                        r"in mixed.schema.json"):
        load_file(tmp_path / "mixed")

    schema_path(tmp_path / "mixed").write_text(json.dumps({"size": [8, 8], "channels": 3, "mean": [0.5] * 3,
                                                           "std": [0.25] * 3}))
    data = load_file(tmp_path / "mixed")
    assert data.x.shape == (8, 3, 8, 8) and data.spec.input_shape == (3, 8, 8)
    grey = np.asarray(PILImage.fromarray(mixed[5]).convert("RGB").resize((8, 8), PILImage.Resampling.BILINEAR))
    np.testing.assert_allclose(data.x[5], (grey.transpose(2, 0, 1) / 255.0 - 0.5) / 0.25, atol=1e-5)

    # The ledger's records are the decoded pixels and classes, not the schema's inputs: the same images
    # under another size or normalisation are the same data; one changed image is one new record.
    schema_path(tmp_path / "mixed").write_text(json.dumps({"size": [16, 16], "channels": 1}))
    assert records_digest(load_file(tmp_path / "mixed")) == records_digest(data)
    changed = list(mixed)
    changed[0] = np.zeros_like(changed[0])
    hf_dataset(changed, labels).save_to_disk(str(tmp_path / "changed"))
    schema_path(tmp_path / "changed").write_text(json.dumps({"size": [8, 8], "channels": 1}))
    assert len(np.intersect1d(record_hashes(load_file(tmp_path / "changed")), record_hashes(data))) == 7


def test_what_cannot_be_read_is_refused_in_one_line(tmp_path):
    from datasets import Dataset, DatasetDict, Image

    images, labels = pixels(count=4)
    two = hf_dataset(images, labels, scan=(Image(), [p for p in images]))
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"two: needs one image column; found \['image', 'scan'\]"):
        load_file(tmp_path / "two")

    damaged = Dataset.from_dict({"image": [{"bytes": b"\x89PNG not really", "path": None}], "label": [0]})
    damaged.cast_column("image", Image()).save_to_disk(str(tmp_path / "damaged"))
    with pytest.raises(DataError, match=r"damaged: row 0 is not a readable image \(UnidentifiedImageError\)"):
        load_file(tmp_path / "damaged")

    hf_dataset(images, labels).rename_column("label", "finding").save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"unlabelled: no label column 'label'; found \['image', 'finding'\]"):
        load_file(tmp_path / "unlabelled")

    hf_dataset(images, labels).save_to_disk(str(tmp_path / "table-schema"))
    schema_path(tmp_path / "table-schema").write_text(json.dumps({"numeric": {"age": {}}}))
    with pytest.raises(DataError, match="an image schema is"):
        load_file(tmp_path / "table-schema")

    DatasetDict({"train": hf_dataset(images, labels)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"a DatasetDict; save one split"):
        load_file(tmp_path / "splits")


def test_a_simulation_partitions_an_image_dataset_and_learns_under_dp(tmp_path):
    images, labels = pixels(count=120, size=(12, 12))
    hf_dataset(images, labels).save_to_disk(str(tmp_path / "scans"))
    schema_path(tmp_path / "scans").write_text(json.dumps({"size": [8, 8], "channels": 1, "mean": [0.5],
                                                           "std": [0.5]}))
    dataset = str(tmp_path / "scans")
    split = load_dataset(dataset)
    scheme = PartitionScheme("iid", 2, seed=0)
    parts = partition_indices(split.train, scheme)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(split.train)))
    share = load_partition(dataset, 1, scheme)
    assert len(share) == len(parts[1]) and share.x.shape[1:] == (1, 8, 8)

    from inprocess import assert_two_nodes_learn_images_under_dp

    assert_two_nodes_learn_images_under_dp(tmp_path, dataset)


def test_a_node_trains_on_its_image_dataset_and_its_ledger_knows_the_images_in_any_file(tmp_path):
    """A deployed node whose data-path is a saved image dataset trains under DP; the same images as a
    .parquet under another normalisation are the same records: the next round charges the same ledger."""
    from flwr.app import Context, RecordDict

    from fedsafe.client.app import train_round
    from fedsafe.client.policy import NodePolicy
    from fedsafe.server.config import RunConfig

    from node_harness import train_message

    images, labels = pixels(count=48)
    dataset = hf_dataset(images, labels)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "scans.parquet"))
    schema_path(tmp_path / "scans.parquet").write_text(json.dumps({"size": [10, 10], "channels": 1,
                                                                   "mean": [0.5], "std": [0.5]}))
    cfg = RunConfig(num_rounds=2, model="mlp", dataset=str(tmp_path / "saved"), local_epochs=1)
    ledgers = tmp_path / "ledgers"
    epsilon = []
    for rnd, data_path in ((1, tmp_path / "saved"), (2, tmp_path / "scans.parquet")):
        context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = train_round(train_message(cfg, rnd), context, NodePolicy(state_dir=str(ledgers),
                                                                         data_path=str(data_path)))
        assert not reply.has_error(), reply.error.reason
        epsilon.append(reply.content["metrics"]["epsilon"])
    assert 0 < epsilon[0] < epsilon[1]  # composed on one ledger, not a fresh budget for a re-saved copy
    assert len(list(ledgers.glob("*.json"))) == 1
