"""Your own tables: .csv and .parquet with categorical and missing values, encoded from a declared
schema so that every node's inputs have the same layout whatever rows it holds; such a table loads,
partitions and trains under DP (small files made here)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedsafe.client.data import DataError, PartitionScheme, load_dataset, load_file, partition_indices, schema_path

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SCHEMA = {"numeric": {"age": {"fill": 40}}, "categorical": {"region": ["north", "south", "east"]}}


def _table(path, frame, schema=SCHEMA):
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    if schema is not None:
        schema_path(path).write_text(json.dumps(schema))
    return path


def test_nodes_with_different_categories_get_the_same_input_layout(tmp_path):
    """Node A has only 'north' (and a missing age), node B only 'south' and a region nobody declared."""
    a = load_file(_table(tmp_path / "a.csv", pd.DataFrame({"age": [30, None], "region": ["north", "north"],
                                                            "label": [0, 1]})))
    b = load_file(_table(tmp_path / "b.csv", pd.DataFrame({"age": [50, 60], "region": ["south", "west"],
                                                            "label": [1, 0]})))
    assert a.spec.input_shape == b.spec.input_shape == (6,)  # age, age_missing, north, south, east, other
    np.testing.assert_array_equal(a.x, [[30, 0, 1, 0, 0, 0], [40, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b.x, [[50, 0, 0, 1, 0, 0], [60, 0, 0, 0, 0, 1]])


def test_parquet_reads_as_the_same_csv(tmp_path):
    frame = pd.DataFrame({"age": [30.0, None, 20.0], "region": ["east", None, "north"], "label": [0, 1, 1]})
    csv, parquet = load_file(_table(tmp_path / "t.csv", frame)), load_file(_table(tmp_path / "t.parquet", frame))
    np.testing.assert_array_equal(csv.x, parquet.x)
    np.testing.assert_array_equal(csv.y, parquet.y)
    assert csv.x[1].tolist() == [40, 1, 0, 0, 0, 1]  # missing region: the 'other' column


def test_a_table_that_needs_a_schema_or_breaks_it_is_named(tmp_path):
    frame = pd.DataFrame({"age": [30, None], "region": ["north", "south"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"non-numeric feature value in column\(s\) \['region'\]"):
        load_file(_table(tmp_path / "n.csv", frame[["region", "label"]], schema=None))
    with pytest.raises(DataError, match=r"missing values in column\(s\) \['age'\]"):
        load_file(_table(tmp_path / "m.csv", frame[["age", "label"]], schema=None))
    with pytest.raises(DataError, match=r"undeclared \['income'\]"):
        load_file(_table(tmp_path / "u.csv", frame.assign(income=[1, 2])))
    with pytest.raises(DataError, match="a schema is"):
        load_file(_table(tmp_path / "s.csv", frame, schema={"categorical": {"region": "north"}}))


def test_a_table_with_categories_and_gaps_partitions_and_trains(tmp_path):
    """The label is the region (north/east: 1); ages have gaps. Three nodes learn it under DP."""
    rng = np.random.default_rng(0)
    n = 600
    region = rng.choice(["north", "south", "east", "west"], n)
    age = rng.normal(50, 10, n).round()
    age[rng.random(n) < 0.2] = np.nan
    frame = pd.DataFrame({"age": age / 100, "region": region, "label": np.isin(region, ["north", "east"]).astype(int)})
    path = _table(tmp_path / "bank.parquet", frame)
    split = load_dataset(str(path))
    parts = partition_indices(split.train, PartitionScheme("iid", 3, seed=0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(split.train)))

    from tests.inprocess import federate

    cfg, outcome, _ = federate(tmp_path, nodes=3, dataset=str(path), num_rounds=2, lr=0.5, epsilon=3.0)
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [3, 3]
    assert 2.9 <= rounds[-1]["epsilon_max"] <= 3.0
    first, last = outcome.history[0]["eval"]["accuracy"], outcome.history[-1]["eval"]["accuracy"]
    assert last >= 0.85 and last > first, (first, last)


def test_a_saved_hugging_face_dataset_reads_as_its_table(tmp_path):
    from datasets import Dataset

    frame = pd.DataFrame({"age": [30.0, None, 20.0, 44.0], "region": ["east", None, "north", "south"],
                          "label": [0, 1, 1, 0]})
    saved = tmp_path / "hf"
    Dataset.from_pandas(frame).save_to_disk(str(saved))
    schema_path(saved).write_text(json.dumps(SCHEMA))
    from_hf, from_csv = load_file(saved), load_file(_table(tmp_path / "t.csv", frame))
    np.testing.assert_array_equal(from_hf.x, from_csv.x)
    np.testing.assert_array_equal(from_hf.y, from_csv.y)
    Dataset.from_dict({"x": [[1.0, 2.0]], "label": [0]}).save_to_disk(str(tmp_path / "lists"))
    with pytest.raises(DataError, match=r"column\(s\) \['x'\] are not table values"):
        load_file(tmp_path / "lists")
