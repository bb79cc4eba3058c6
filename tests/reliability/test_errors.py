"""The bad-input catalogue (docs/errors.md) as tests: every bad input dtrain recognises, run as a user would run it
(a fresh process), fails with its one-line message, a non-zero exit status, and no earlier output touched.

CASES is the catalogue: one row per bad input, each with the command, the files it reads, extra environment and the
exact message line. `{name}` in a command or an environment value and `<name>` in a message stand for the same thing:
a path or value that a session fixture of that name below makes (built once, on first use: a prepared dataset, a
finished fine-tuning run ...), or one of `files` (this case's own input files, written first), `new_run` (a run dir
that does not exist yet), `repo`, `python`. Each case checks the exact line (the last of stderr), exit status 2, and
that every earlier output it names (and its own files) is byte-for-byte as before: size, mtime, sha256.
`test_the_catalogue_and_the_tests_agree` keeps docs/errors.md and CASES in step: the same rows, categories, messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import make_corpus, make_tokenizer

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    category: str  # config, data, checkpoint, launch
    name: str
    command: tuple[str, ...]
    message: str  # the whole stderr line
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {files} first
    env: dict[str, str] = field(default_factory=dict)
    cpu_only: bool = False  # the input is only bad on a machine without a GPU


PY = "{python}"
DTRAIN = (PY, "-m", "dtrain")
PRETRAIN = (PY, "-m", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml", "data.train={data}",
            "model.tokenizer={tokenizer}", "run_dir={new_run}", "logging.progress_bar=false",
            "logging.tensorboard=false")
FINETUNE = (PY, "-m", "dtrain.finetune", "--config", "configs/finetune/debug.yaml", "data.train={train}",
            "data.eval=null", "data.test=null", "model.tokenizer={tokenizer}", "run_dir={new_run}",
            "data.max_seq_len=32", "logging.progress_bar=false", "logging.tensorboard=false")
PREPARE_FT = (*DTRAIN, "prepare", "finetune", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
              "--workers", "1")
E = "dtrain: error: "

CASES = [
    # -- config: YAML, keys, values, combinations --------------------------------------------------------------------
    Case("config", "unknown-key", (*FINETUNE, "run_dir={run_dir}", "optim.lrr=1e-4"),
         E + "unknown key optim.lrr — did you mean optim.lr? (command-line override optim.lrr=1e-4)"),
    Case("config", "wrong-type",
         (*DTRAIN, "config", "show", "--config", "configs/finetune/debug.yaml", "data.micro_batch_size=lots"),
         E + "data.micro_batch_size: expected int, got 'lots' (str) (command-line override "
             "data.micro_batch_size=lots)"),
    Case("config", "out-of-range",
         (*DTRAIN, "config", "show", "--config", "configs/pretrain/debug.yaml", "schedule.grad_accum_steps=0"),
         E + "schedule.grad_accum_steps: must be >= 1, got 0 (command-line override schedule.grad_accum_steps=0)"),
    Case("config", "missing-config-file", (*FINETUNE, "run_dir={run_dir}", "--config", "{files}/sentiment.yaml"),
         E + "config file <files>/sentiment.yaml not found; pass an existing YAML file to --config"),
    Case("config", "yaml-syntax", (*DTRAIN, "config", "show", "--config", "{files}/run.yaml"),
         E + "<files>/run.yaml: not valid YAML (while parsing a block mapping); fix the syntax",
         files={"run.yaml": "optim:\n  lr: 1e-4\n betas: [0.9, 0.98]\n"}),
    Case("config", "base-cycle", (*DTRAIN, "config", "show", "--config", "{files}/a.yaml"),
         E + "<files>/a.yaml: inheritance cycle (<files>/a.yaml → <files>/b.yaml → <files>/a.yaml); remove one of "
             "the base: entries",
         files={"a.yaml": "base: b.yaml\noptim:\n  lr: 1e-4\n", "b.yaml": "base: a.yaml\n"}),
    Case("config", "zero-stage-with-ddp", (*PRETRAIN, "parallel.engine=ddp", "parallel.zero_stage=2"),
         E + "parallel.zero_stage=2 needs parallel.engine=deepspeed (DDP has no ZeRO); set parallel.engine=deepspeed "
             "or parallel.zero_stage=0"),
    Case("config", "nccl-without-gpu", (*FINETUNE, "run_dir={run_dir}", "parallel.backend=nccl"),
         E + "parallel.backend=nccl needs CUDA GPUs, and none is visible; use parallel.backend=gloo or auto",
         cpu_only=True),
    Case("config", "deepspeed-fp16-on-cpu", (*PRETRAIN, "parallel.engine=deepspeed", "precision.dtype=fp16"),
         E + "DeepSpeed refuses fp16 on a CPU (it needs AVX512-FP16/AMX); use precision.dtype=bf16, or "
             "parallel.engine=ddp, whose GradScaler does fp16 on CPU",
         cpu_only=True),
    Case("config", "unknown-eval-metric", (*FINETUNE, "data.eval={dev}", "eval.metric=f1"),
         E + "eval.metric=f1: the evaluation reports accuracy, loss, macro_f1, macro_precision, macro_recall, support, "
             "weighted_f1, weighted_precision, weighted_recall; set eval.metric to one of them"),
    # -- data: `dtrain prepare` inputs ---------------------------------------------------------------------------------
    Case("data", "prepare-output-exists",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{data}", "--tokenizer", "{tokenizer}"),
         E + "<data> already exists and is not empty; choose another output dir or pass --overwrite"),
    Case("data", "prepare-missing-input",
         (*DTRAIN, "prepare", "pretrain", "{files}/wiki.txt", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
          "--workers", "1"),
         E + "input <files>/wiki.txt does not exist; pass existing files or folders"),
    Case("data", "prepare-non-bio-tag", (*PREPARE_FT, "{files}/ner.conll"),
         E + "<files>/ner.conll line 2: tag 'E-ORG' is not BIO/IOB2 (O, B-TYPE or I-TYPE); convert the tags (e.g. "
             "BIOES E-/S- to I-/B-, bare types to B-/I-)",
         files={"ner.conll": "the\tO\nteam\tE-ORG\n"}),
    Case("data", "prepare-unknown-label", (*PREPARE_FT, "{files}/dev.jsonl", "--labels", "{train}"),
         E + "<files>/dev.jsonl line 3: label 'meh' is not in <train>/labels.json (known: neg, pos); fix the label or "
             "prepare the training set so that it includes it",
         files={"dev.jsonl": "".join(json.dumps({"text": "the growth", "label": label}) + "\n"
                                     for label in ("pos", "neg", "meh"))}),
    Case("data", "prepare-missing-text-column", (*PREPARE_FT, "{files}/reviews.csv"),
         E + "<files>/reviews.csv: no column 'text' in the header (columns: review, label); rename the column or pass "
             "--text-field",
         files={"reviews.csv": "review,label\nthe growth,pos\nthe police,neg\n"}),
    # -- data: prepared datasets and label maps given to a run ---------------------------------------------------------
    Case("data", "train-not-set", (*FINETUNE, "run_dir={run_dir}", "data.train=null"),
         E + "data.train is not set; point it at a dataset dir made by `dtrain prepare finetune`"),
    Case("data", "train-not-prepared", (*PRETRAIN, "data.train={corpus}"),
         E + "<corpus> has no manifest.json: not a prepared dataset (or preparation did not finish); run `dtrain "
             "prepare`"),
    Case("data", "tokenizer-mismatch", (*PRETRAIN, "model.tokenizer={other_tokenizer}"),
         E + "<data>/manifest.json: prepared with tokenizer <tokenizer> (fingerprint <fingerprint>), but the model's "
             "tokenizer has fingerprint <other_fingerprint>; re-run `dtrain prepare` with the model's tokenizer"),
    Case("data", "shard-truncated", (*PRETRAIN, "data.train={truncated}"),
         E + "shard <truncated>/shard-00000.arrow is truncated or changed (1000 bytes, manifest says <shard_bytes>); "
             "re-run `dtrain prepare` for <truncated>"),
    Case("data", "shard-corrupted", (*PRETRAIN, "data.train={corrupted}", "data.verify=full"),
         E + "shard <corrupted>/shard-00000.arrow fails its checksum (sha256 differs from manifest.json); the file is "
             "corrupted: re-run `dtrain prepare` for <corrupted>"),
    # -- checkpoint, resume, export, predict ---------------------------------------------------------------------------
    Case("checkpoint", "resume-missing-checkpoint",
         (*FINETUNE, "checkpoint.resume={run_dir}/checkpoints/step-00000099"),
         E + "checkpoint.resume=<run_dir>/checkpoints/step-00000099: not a complete, intact dtrain checkpoint (no "
             "trainer.json); pass another step-N dir, auto or none"),
    Case("checkpoint", "resume-other-model-shape",
         (*FINETUNE, "data.train={three_labels}", "checkpoint.resume={run_dir}/checkpoints/step-00000001"),
         E + "checkpoint <run_dir>/checkpoints/step-00000001 does not fit this model/optimizer (Error(s) in loading "
             "state_dict for BertForSequenceClassification:); resume with the config it was written with, or start "
             "fresh (checkpoint.resume=none or another run_dir)"),
    Case("checkpoint", "export-output-not-empty", (*DTRAIN, "export", "{run_dir}", "{files}/hf"),
         E + "<files>/hf already exists and is not empty; choose another output dir or pass --overwrite",
         files={"hf/README.md": "the model card\n"}),
    Case("checkpoint", "predict-output-exists",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.txt", "--output",
          "{files}/predictions.jsonl"),
         E + "--output <files>/predictions.jsonl exists; pass --overwrite or choose another file",
         files={"reviews.txt": "the growth\nthe police\n", "predictions.jsonl": '{"text": "the growth"}\n'}),
    # -- launch: slurm/*.sh outside Slurm, launch.torchrun, launch.submit ---------------------------------------------
    Case("launch", "slurm-missing-config", ("bash", "slurm/finetune.sh"),
         "dtrain-slurm: error: DTRAIN_CONFIG=configs/finetune/sentiment.yaml: no such file (relative paths start at "
         "<repo>)",
         env={"DTRAIN_CONFIG": "configs/finetune/sentiment.yaml", "DTRAIN_RUN_DIR": "{run_dir}"}),
    Case("launch", "torchrun-nproc-not-a-number",
         (PY, "-m", "launch.torchrun", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml"),
         "launch.torchrun: error: DTRAIN_NPROC_PER_NODE='zero' is not a whole number; set it to an integer ≥ 1 or "
         "unset it",
         env={"DTRAIN_NPROC_PER_NODE": "zero"}),
    Case("launch", "torchrun-job-without-nodelist",
         (PY, "-m", "launch.torchrun", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml"),
         "launch.torchrun: error: SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside an sbatch/salloc job",
         env={"SLURM_JOB_ID": "4242"}),
    Case("launch", "submit-missing-config",
         (PY, "-m", "launch.submit", "pretrain", "--config", "{files}/phase1.yaml", "--local"),
         "launch.submit: error: --config <files>/phase1.yaml: no such file"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Earlier outputs, built once per session: what a bad command could touch (and must not)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> Path:
    return tokenizer_dir


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer with one more word: another vocabulary, another fingerprint."""
    return make_tokenizer(tmp_path_factory.mktemp("other_tokenizer"), extra=("zebra",))


def _fingerprint(path: Path) -> str:
    from dtrain.data.prepare import load_tokenizer
    from dtrain.data.shards import tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(path))


@pytest.fixture(scope="session")
def fingerprint(tokenizer) -> str:
    return _fingerprint(tokenizer)


@pytest.fixture(scope="session")
def other_fingerprint(other_tokenizer) -> str:
    return _fingerprint(other_tokenizer)


@pytest.fixture(scope="session")
def data(pretrain_data) -> Path:
    """A prepared pretraining dataset (3 shards)."""
    return pretrain_data


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Raw text: a folder of .txt documents."""
    return make_corpus(tmp_path_factory.mktemp("raw") / "corpus", docs=6)


@pytest.fixture(scope="session")
def shard_bytes(data) -> str:
    return str(json.loads((data / "manifest.json").read_text())["shards"][0]["bytes"])


def _damaged_copy(data: Path, root: Path, damage: Callable[[bytes], bytes]) -> Path:
    copy = Path(shutil.copytree(data, root / "data"))
    shard = copy / "shard-00000.arrow"
    shard.write_bytes(damage(shard.read_bytes()))
    return copy


@pytest.fixture(scope="session")
def truncated(data, tmp_path_factory) -> Path:
    """The dataset with its first shard cut to 1000 bytes (a copy that did not finish)."""
    return _damaged_copy(data, tmp_path_factory.mktemp("truncated"), lambda b: b[:1000])


@pytest.fixture(scope="session")
def corrupted(data, tmp_path_factory) -> Path:
    """The dataset with 16 bytes inside the first shard flipped: the same size, another checksum."""
    def flip(b: bytes) -> bytes:
        middle = len(b) // 2
        return b[:middle] + bytes(x ^ 0xFF for x in b[middle:middle + 16]) + b[middle + 16:]

    return _damaged_copy(data, tmp_path_factory.mktemp("corrupted"), flip)


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Labelled train/dev/test sets (pos/neg), dev and test prepared with the training set's label map."""
    from tests.integration.test_training import write_sentiment

    return write_sentiment(tmp_path_factory.mktemp("sentiment"), tokenizer)


@pytest.fixture(scope="session")
def train(sentiment) -> Path:
    return sentiment["train"]


@pytest.fixture(scope="session")
def dev(sentiment) -> Path:
    return sentiment["dev"]


@pytest.fixture(scope="session")
def three_labels(tmp_path_factory, tokenizer) -> Path:
    """A training set with a third label (meh): the sentiment run's head does not fit its model."""
    from dtrain.data.prepare import prepare_finetune

    root = tmp_path_factory.mktemp("three_labels")
    rows = [{"text": f"the {word}", "label": label} for word, label in
            [("growth", "pos"), ("police", "neg"), ("market", "meh")] * 8]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_finetune([str(root / "rows.jsonl")], root / "data", str(tokenizer), max_seq_len=32, workers=1)
    return root / "data"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer, train) -> Path:
    """A finished fine-tuning run: config.yaml, checkpoints/step-00000001, export/, report.json, status.json."""
    path = tmp_path_factory.mktemp("finetuned") / "run"
    values = {"python": sys.executable, "train": train, "tokenizer": tokenizer, "new_run": path}
    command = [part.format_map(values) for part in FINETUNE] + ["schedule.max_steps=1"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (path / "checkpoints" / "step-00000001" / "trainer.json").is_file() and (path / "export").is_dir()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without Slurm's or dtrain's settings, offline, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DTRAIN_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "DTRAIN_PYTHON": sys.executable, **extra}


class Values(dict):
    """Placeholder → value: a few fixed ones, the rest from the session fixtures of the same name (built on use)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        super().__init__(python=sys.executable, repo=str(REPO), files=tmp_path / "files", new_run=tmp_path / "run")
        self.request = request

    def __missing__(self, name: str) -> object:
        self[name] = self.request.getfixturevalue(name)
        return self[name]


def fill(message: str, values: Values) -> str:
    """A catalogue message with its <placeholders> replaced (`<train dir>`, with a space, is part of a message)."""
    return re.sub(r"<([a-z_]+)>", lambda m: str(values[m.group(1)]), message)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root as (size, mtime_ns, sha256); directories by their existence only."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(path)] = ("dir",)
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.skipif(
    c.cpu_only and CUDA, reason="a GPU makes this input valid")]) for c in CASES])
def test_bad_input_fails_in_one_line_and_touches_nothing(case: Case, request, tmp_path):
    values = Values(request, tmp_path)
    for name, content in case.files.items():
        path = values["files"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    values["files"].mkdir(exist_ok=True)
    command = [part.format_map(values) for part in case.command]
    env = _env(**{k: v.format_map(values) for k, v in case.env.items()})
    expected = fill(case.message, values)
    # the earlier outputs: this case's files and every fixture path the command or message names
    watched = [v for k, v in values.items() if isinstance(v, Path) and k != "new_run" and v.exists()]
    before = {str(p): snapshot(p) for p in watched}

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)

    lines = result.stderr.splitlines()
    assert expected in lines, f"expected the line\n{expected}\nin stderr:\n{result.stderr[-3000:]}"
    assert lines[-1] == expected, f"not the last line of stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, f"exit status {result.returncode}"
    assert {str(p): snapshot(p) for p in watched} == before, "an earlier output was modified"


# ---------------------------------------------------------------------------------------------------------------------
# The catalogue and the tests agree
# ---------------------------------------------------------------------------------------------------------------------


def read_catalogue(path: Path = DOC) -> dict[str, tuple[str, str]]:
    """name → (category, message) from the Markdown table of docs/errors.md: | Category | Name | Bad input | Message
    | Fix |, the name in `...`, the message in ``...``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Category | Name |"))
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, f"{path}: a row without 5 cells: {line}"
        category, name, _, message, _ = cells
        assert name.startswith("`") and message.startswith("`` ") and message.endswith(" ``"), line
        assert name.strip("`") not in rows, f"{path}: {name} twice"
        rows[name.strip("`")] = (category, message[3:-3])
    return rows


def test_the_catalogue_and_the_tests_agree():
    documented = read_catalogue()
    tested = {c.name: (c.category, c.message) for c in CASES}
    assert len(tested) == len(CASES), "two cases with the same name"
    assert sorted(set(documented) - set(tested)) == [], "rows of docs/errors.md without a test case"
    assert sorted(set(tested) - set(documented)) == [], "test cases missing from docs/errors.md"
    for name, row in tested.items():
        assert documented[name] == row, f"{name}: docs/errors.md says {documented[name]}, the test {row}"
