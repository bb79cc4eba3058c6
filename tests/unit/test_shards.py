"""The on-disk format: round trip, and every way a dataset dir can be broken, each with a one-line error."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from dtrain.data.shards import ShardedDataset, ShardError, ShardWriter, tokenizer_fingerprint
from dtrain.model.tokenizer import load_tokenizer
from tests.conftest import make_tokenizer

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


def write_dataset(path, rows=100, shard_bytes=512):
    path.mkdir(parents=True)
    writer = ShardWriter(path, SCHEMA, shard_bytes)
    for start in range(0, rows, 10):
        ids = [list(range(i % 7 + 1)) for i in range(start, start + 10)]
        writer.write({"input_ids": ids, "length": [len(x) for x in ids]})
    return writer.close(kind="test", tokenizer={"name": "t", "fingerprint": "abc"})


def test_round_trip_over_several_shards(tmp_path):
    manifest = write_dataset(tmp_path / "d")
    assert len(manifest["shards"]) > 3 and manifest["rows"] == 100
    data = ShardedDataset(tmp_path / "d", verify="full")
    assert len(data) == 100
    for i in (0, 9, 10, 55, 99):
        assert data[i]["input_ids"].tolist() == list(range(i % 7 + 1))
        assert data.get(i, "length") == i % 7 + 1
    assert data.column("length").tolist() == [i % 7 + 1 for i in range(100)]
    with pytest.raises(IndexError):
        data[100]


@pytest.fixture
def dataset(tmp_path):
    write_dataset(tmp_path / "d")
    return tmp_path / "d"


def test_missing_shard(dataset):
    (dataset / "shard-00001.arrow").unlink()
    with pytest.raises(ShardError, match=r"^shard .*shard-00001\.arrow is missing; re-run `dtrain prepare`"):
        ShardedDataset(dataset)


def test_truncated_shard(dataset):
    shard = dataset / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"shard .*shard-00002\.arrow is truncated or changed \(\d+ bytes, manifest"):
        ShardedDataset(dataset)


def test_checksum_mismatch(dataset):
    shard = dataset / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    ShardedDataset(dataset)  # the cheap size check cannot see it
    with pytest.raises(ShardError, match=r"shard .*shard-00000\.arrow fails its checksum .* re-run `dtrain prepare`"):
        ShardedDataset(dataset, verify="full")


def test_manifest_from_another_format_version(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps(manifest | {"version": 0}))
    with pytest.raises(ShardError, match=r"manifest\.json has format version 0, this dtrain reads version 1; re-run"):
        ShardedDataset(dataset)


def test_not_a_dataset(tmp_path):
    with pytest.raises(ShardError, match=r"dataset dir .* does not exist; run `dtrain prepare`"):
        ShardedDataset(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(ShardError, match=r"has no manifest\.json: not a prepared dataset"):
        ShardedDataset(tmp_path / "half")


def test_tokenizer_fingerprint_must_match(dataset, tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    fp = tokenizer_fingerprint(tok)
    with pytest.raises(ShardError, match=rf"prepared with tokenizer t \(fingerprint abc\), but the model's tokenizer "
                                         rf"has fingerprint {fp}; re-run `dtrain prepare`"):
        ShardedDataset(dataset, expect_fingerprint=fp)
    # the fingerprint follows the vocabulary: a copy is equal, one changed token is not
    shutil.copytree(tokenizer_dir, tmp_path / "copy")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == fp
    assert tokenizer_fingerprint(load_tokenizer(make_tokenizer(tmp_path / "other", extra=("zebra",)))) != fp


def test_readers_share_nothing_across_pickling(dataset):
    import pickle

    data = ShardedDataset(dataset)
    data[0]
    clone = pickle.loads(pickle.dumps(data))
    assert clone._open == {} and np.array_equal(clone[42]["input_ids"], data[42]["input_ids"])
