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
