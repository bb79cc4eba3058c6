"""Outputs against inputs, and one user at a time (issue 15, items 2, 3, 10 and 15): an output is never an input of
the same command, never inside or above one, never a run dir or another kind of output; --overwrite replaces only an
earlier output of the same kind; a run dir or an output being written is locked (flock: it dies with its process);
output paths that cannot be written and a disk that fills up are one line; a killed prepare's leftovers are removed by
the next one; exported files get the umask's modes. The one-line cases are rows of docs/errors.md as well."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain import cli
from tests.conftest import make_corpus
from tests.reliability import test_errors
from tests.reliability.test_errors import FINETUNE, REPO, _env, snapshot

# the catalogue's session fixtures: a tokenizer, labelled sets, a finished fine-tuning run (config, checkpoint, export)
tokenizer, sentiment, train, run_dir = test_errors.tokenizer, test_errors.sentiment, test_errors.train, \
    test_errors.run_dir

E = "dtrain: error: "
RUN_LOCK = ".dtrain.lock"  # dtrain.locks.RUN_LOCK


def dtrain(capsys, *args: object) -> tuple[int, list[str]]:
    """`dtrain ARGS` in this process: (exit status, the lines of stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    return status, capsys.readouterr().err.splitlines()


def refused(capsys, line: str, *args: object) -> None:
    status, err = dtrain(capsys, *args)
    assert (status, err) == (2, [E + line])


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus", docs=6)


def prepare(tokenizer: Path, corpus: Path, out: Path, *extra: object) -> tuple:
    return ("prepare", "pretrain", corpus, "--out", out, "--tokenizer", tokenizer, "--workers", "1", *extra)


# ---------------------------------------------------------------------------------------------------------------------
# Path relations and --overwrite (item 2)
# ---------------------------------------------------------------------------------------------------------------------


def test_export_never_writes_over_or_into_its_run(capsys, run_dir, tmp_path):
    before = snapshot(run_dir.parent)
    ckpt = run_dir / "checkpoints" / "step-00000001"
    for out in (run_dir, run_dir / "checkpoints", run_dir.parent):
        refused(capsys, f"OUT {out} contains the checkpoint {ckpt}; write the output to a path that does not hold "
                        f"the command's inputs", "export", run_dir, out, "--overwrite")
    refused(capsys, f"OUT {ckpt / 'model'} lies inside the checkpoint {ckpt}; write the output outside it",
            "export", ckpt, ckpt / "model")
    hf = tmp_path / "hf"
    (hf / "notes").mkdir(parents=True)
    refused(capsys, f"OUT {hf} exists and is a folder of other files, not an export dir; choose another output dir "
                    f"(--overwrite replaces only an export dir)", "export", run_dir, hf, "--overwrite")
    assert snapshot(run_dir.parent) == before
    (hf / "notes").rmdir()
    for _ in range(2):  # an earlier export is replaced
        assert dtrain(capsys, "export", run_dir, hf, "--overwrite")[0] == 0
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    refused(capsys, f"OUT {link} contains the checkpoint {ckpt}; write the output to a path that does not hold the "
                    f"command's inputs", "export", ckpt, link, "--overwrite")


def test_prepare_overwrite_replaces_only_a_dataset(capsys, tokenizer, corpus, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    refused(capsys, f"--out {mine} exists and is a folder of other files, not a dataset dir; choose another output "
                    f"dir (--overwrite replaces only a dataset dir)", *prepare(tokenizer, corpus, mine, "--overwrite"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    refused(capsys, f"--out {notes} is a file dtrain did not write, not a directory; choose a new directory for the "
                    f"output", *prepare(tokenizer, corpus, notes, "--overwrite"))
    refused(capsys, f"--out {corpus} is also the input {corpus}; write the output to another path",
            *prepare(tokenizer, corpus, corpus, "--overwrite"))
    refused(capsys, f"--out {corpus / 'data'} lies inside the input {corpus}; write the output outside it",
            *prepare(tokenizer, corpus, corpus / "data"))
    refused(capsys, f"--out {tmp_path} contains the input {corpus}; write the output to a path that does not hold the "
                    f"command's inputs", *prepare(tokenizer, corpus, tmp_path, "--overwrite"))
    link = tmp_path / "link"
    link.symlink_to(corpus)
    refused(capsys, f"--out {link} is also the input {corpus}; write the output to another path",
            *prepare(tokenizer, corpus, link, "--overwrite"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    refused(capsys, f"--out {run} exists and is a run dir, not a dataset dir; choose another output dir (--overwrite "
                    f"replaces only a dataset dir)", *prepare(tokenizer, corpus, run, "--overwrite"))
    assert (mine / "notes.txt").read_text() == notes.read_text() == "my notes\n" and (run / "checkpoints").is_dir()
    data = tmp_path / "data"
    assert dtrain(capsys, *prepare(tokenizer, corpus, data))[0] == 0
    assert dtrain(capsys, *prepare(tokenizer, corpus, data, "--overwrite", "--short-seq-prob", "0.2"))[0] == 0
    assert json.loads((data / "manifest.json").read_text())["short_seq_prob"] == 0.2  # replaced: the same kind
    (data / "README.md").write_text("what this dataset is\n")  # a user's file in it: no longer only dtrain's
    refused(capsys, f"--out {data} exists and is a folder of other files, not a dataset dir; choose another output dir "
                    f"(--overwrite replaces only a dataset dir)", *prepare(tokenizer, corpus, data, "--overwrite"))
    assert (data / "README.md").is_file()


def test_predict_never_replaces_its_input_or_a_file_it_did_not_write(capsys, run_dir, tmp_path):
    rows = tmp_path / "reviews.jsonl"
    rows.write_text('{"text": "the growth", "label": "pos"}\n{"text": "the police", "label": "neg"}\n')
    predict = ("predict", "--model", run_dir, "--input", rows)
    refused(capsys, f"--output {rows} is also --input {rows}; write the output to another path",
            *predict, "--output", rows, "--overwrite")
    refused(capsys, f"--output {run_dir / 'export' / 'config.json'} lies inside --model {run_dir / 'export'}; write "
                    f"the output outside it", *predict, "--output", run_dir / "export" / "config.json", "--overwrite")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "mine"}\n')
    refused(capsys, f"--output {notes} exists and is a file dtrain did not write, not a predictions file of dtrain "
                    f"predict; choose another file (--overwrite replaces only a predictions file of dtrain predict)",
            *predict, "--output", notes, "--overwrite")
    folder = tmp_path / "out"
    folder.mkdir()
    refused(capsys, f"--output {folder} is a directory; name a file, e.g. {folder / 'predictions.jsonl'}",
            *predict, "--output", folder, "--overwrite")
    assert rows.read_text().count("\n") == 2 and notes.read_text() == '{"text": "mine"}\n'
    out = tmp_path / "preds.jsonl"
    for _ in range(2):  # its own earlier predictions are replaced
        assert dtrain(capsys, *predict, "--output", out, "--overwrite")[0] == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["the growth", "the police"]
    report = tmp_path / "report.json"
    refused(capsys, f"--output {out} exists and is a predictions file of dtrain predict, not a report of dtrain "
                    f"evaluate; choose another file (--overwrite replaces only a report of dtrain evaluate)",
            "evaluate", "--model", run_dir, "--data", run_dir.parent.parent / "nothing", "--output", out, "--overwrite")
    assert not report.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Output paths that cannot be written (item 10)
# ---------------------------------------------------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written_are_one_line(capsys, tokenizer, corpus, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    refused(capsys, f"--out {notes} is a file dtrain did not write, not a directory; choose a new directory for the "
                    f"output", *prepare(tokenizer, corpus, notes))
    refused(capsys, f"--out {notes / 'data'}: {notes} is a file, so {notes / 'data'} cannot be created under it; "
                    f"choose another path", *prepare(tokenizer, corpus, notes / "data"))
    refused(capsys, "--out /proc/dtrain-test/data: cannot create files in /proc (No such file or directory); choose a "
                    "path in a folder you can write", *prepare(tokenizer, corpus, "/proc/dtrain-test/data"))
    status, err = dtrain(capsys, *prepare(tokenizer, corpus, "/sys/dtrain-test"))
    assert status == 2 and len(err) == 1 and err[0].startswith(E + "--out /sys/dtrain-test: cannot create files in "
                                                                   "/sys (")
    assert notes.read_text() == "my notes\n"


def test_a_disk_that_fills_up_during_prepare_is_one_line(capsys, tokenizer, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        corpus = make_corpus(tmp_path / "corpus", docs=400)
        status, err = dtrain(capsys, *prepare(tokenizer, corpus, small / "data"))
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith(E + f"--out {small / 'data'}: the disk filled up while writing it (")
        assert err[0].endswith(f"MiB free in {small}); free space or choose another output on a larger disk (nothing "
                               f"was replaced; the partial output was removed)")
        assert os.listdir(small) == []  # no partial dataset, no temp dir, no lock file
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---------------------------------------------------------------------------------------------------------------------
# Leftovers and modes (item 15)
# ---------------------------------------------------------------------------------------------------------------------


def test_a_killed_prepares_temp_dir_is_removed_by_the_next_one(capsys, tokenizer, corpus, tmp_path):
    data = tmp_path / "data"
    left = tmp_path / ".data.tmp-k1ll3d00"
    left.mkdir()
    (left / "shard-00000.arrow").write_bytes(b"\0" * 1000)  # what a prepare killed mid-way leaves
    status, err = dtrain(capsys, *prepare(tokenizer, corpus, data))
    assert status == 0 and not left.exists()
    assert err == [f"dtrain: warning: --out {data}: removed .data.tmp-k1ll3d00 left by an earlier dtrain that was "
                   f"stopped while writing it"]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]


def test_exported_and_prepared_files_get_the_umasks_modes(capsys, run_dir, tokenizer, corpus, tmp_path):
    old = os.umask(0o027)
    try:
        assert dtrain(capsys, "export", run_dir, tmp_path / "hf")[0] == 0
        assert dtrain(capsys, *prepare(tokenizer, corpus, tmp_path / "data"))[0] == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "data"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
        assert set(modes.values()) == {"0o640"}, modes
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Locks (item 3)
# ---------------------------------------------------------------------------------------------------------------------


def _holder(lock: Path) -> subprocess.Popen:
    """Another process that takes the lock `lock` (as a running prepare or run would) and waits."""
    code = ("import sys, time; from dtrain.locks import acquire_lock; acquire_lock(sys.argv[1], 'busy', 'x'); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_an_output_being_written_is_refused_and_a_killed_writers_lock_does_not_block(capsys, tokenizer, corpus,
                                                                                     run_dir, tmp_path):
    data, hf = tmp_path / "data", tmp_path / "hf"
    holders = [_holder(tmp_path / ".data.lock"), _holder(tmp_path / ".hf.lock")]
    try:
        host = socket.gethostname()
        refused(capsys, f"--out {data} is being written by another dtrain process (host {host}, pid "
                        f"{holders[0].pid}); wait for it to finish or choose another output",
                *prepare(tokenizer, corpus, data))
        refused(capsys, f"OUT {hf} is being written by another dtrain process (host {host}, pid {holders[1].pid}); "
                        f"wait for it to finish or choose another output", "export", run_dir, hf)
    finally:
        for proc in holders:
            proc.kill()  # kill -9: the lock file stays behind, the lock does not
            proc.wait()
    assert (tmp_path / ".data.lock").is_file()
    assert dtrain(capsys, *prepare(tokenizer, corpus, data))[0] == 0
    assert dtrain(capsys, "export", run_dir, hf)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data", "hf"]  # the lock files went with the locks


def test_two_prepares_of_one_output_the_second_is_refused(tokenizer, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs=2000)  # some seconds of work: the second starts while it runs
    data = tmp_path / "data"
    command = [sys.executable, "-m", "dtrain", *map(str, prepare(tokenizer, corpus, data, "--shard-size", "64KB"))]
    first = subprocess.Popen([*command, "--short-seq-prob", "0.3"], cwd=REPO, env=_env(), stderr=subprocess.PIPE,
                             text=True)
    lock, deadline = tmp_path / ".data.lock", time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:  # until the first holds the output's lock (a
        try:  # loaded machine takes seconds to import transformers: a fixed sleep let the second start first)
            if str(first.pid) in lock.read_text():
                break
        except OSError:
            pass
        time.sleep(0.05)
    second = subprocess.run([*command, "--short-seq-prob", "0.4"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr  # today both succeed, and the second replaces the first
    assert second.stderr.splitlines()[-1] in (
        E + f"--out {data} is being written by another dtrain process (host {socket.gethostname()}, pid "
            f"{first.pid}); wait for it to finish or choose another output",
        E + f"{data} already exists and is not empty; choose another output dir or pass --overwrite")
    assert json.loads((data / "manifest.json").read_text())["short_seq_prob"] == 0.3  # the first dataset stays


def test_a_second_run_on_a_run_dir_in_use_is_refused(tokenizer, train, tmp_path):
    run = tmp_path / "run"
    values = {"python": sys.executable, "train": train, "tokenizer": tokenizer, "new_run": run}
    command = [part.format_map(values) for part in FINETUNE]
    first = subprocess.Popen([*command, "schedule.max_steps=100000", "checkpoint.every_steps=100000"], cwd=REPO,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline:  # until the first run holds the lock
            try:
                if json.loads((run / RUN_LOCK).read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        assert first.poll() is None and (run / RUN_LOCK).is_file(), "the first run never took its run dir's lock"
        second = subprocess.run([*command, "schedule.max_steps=1"], cwd=REPO, env=_env(), capture_output=True,
                                text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert second.returncode == 2, second.stderr  # today both succeed, and the second replaces the first[-3000:]
        assert second.stderr.splitlines()[-1] == (
            E + f"run_dir={run} is in use by another dtrain run (host {socket.gethostname()}, pid {first.pid}); wait "
                f"for it to finish or stop it, or choose another run_dir")
        # under torchrun: rank 0 finds the lock taken and every rank stops with the same line (no hang)
        ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                *command[1:], "schedule.max_steps=1"], cwd=REPO, env=_env(), capture_output=True,
                               text=True, timeout=300, stdin=subprocess.DEVNULL)
        refusals = [line for line in ranks.stderr.splitlines() if f"run_dir={run} is in use by another" in line]
        assert ranks.returncode != 0 and len(refusals) == 2, ranks.stderr[-3000:]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # kill -9: its lock goes with it
        first.wait()
    from dtrain.locks import acquire_lock

    lock = acquire_lock(run / RUN_LOCK, "busy", "x")  # the file is left behind, the lock is not
    lock.release()
    assert not (run / RUN_LOCK).exists()


def test_an_existing_empty_output_dir_is_taken_and_names_are_not_patterns(tmp_path):
    from dtrain import files
    from dtrain.files import atomic_output_dir

    out = tmp_path / "out"
    out.mkdir()  # `mkdir out && dtrain prepare ... --out out`: nothing in it to lose
    with atomic_output_dir(out, kind=files.DATASET) as tmp:
        (tmp / "manifest.json").write_text("{}\n")
    assert (out / "manifest.json").is_file()
    other = tmp_path / ".x1.tmp-abc"  # a leftover of output `x1`, which an output named `x?` must not remove
    other.mkdir()
    files.remove_leftovers(tmp_path / "x?", "--out")
    assert other.is_dir()
