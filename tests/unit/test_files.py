import os

import pytest

from dtrain.files import write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "status.json"
    target.write_text("old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["status.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-00000005\n")
    with pytest.raises(TypeError):
        write_atomic(target, b"not text")  # fails inside the write, after the temp file exists
    assert target.read_text() == "step-00000005\n"
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_only_outputs_dtrain_writes_count_as_its_outputs(tmp_path):
    """--overwrite replaces only an earlier output of the same kind: a user's file with similar keys is not one."""
    import json

    from dtrain.files import PREDICTIONS, REPORT, output_kind

    def kind(name: str, text: str) -> str | None:
        (tmp_path / name).write_text(text)
        return output_kind(tmp_path / name)

    assert kind("r.json", json.dumps({"model": "m", "data": "d", "loss": 0.4, "accuracy": 0.9})) == REPORT
    assert kind("notes.json", json.dumps({"model": "m", "data": "d", "comment": "mine"})) is None
    assert kind("p.jsonl", '{"text": "a", "score": 1.5}\n{"text": "b", "score": -2}\n') == PREDICTIONS
    assert kind("ratings.jsonl", '{"text": "a", "score": "high"}\n') is None
    assert kind("c.jsonl", '{"text": "a", "label": "pos", "score": 0.9, "probabilities": {"pos": 0.9}}\n') \
        == PREDICTIONS
    assert kind("mine.jsonl", '{"text": "a", "entities": "none", "score": "n/a"}\n') is None
