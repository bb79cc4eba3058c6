import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, why_unavailable

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `dtrain ...` as a user would (a fresh process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "dtrain", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli():
    return run_cli


WORDS = ("the a of to and in is was for on that with as by at from his her it be are this which an or had not "
         "but they were have has been one their all new more after first two would who when other year time about "
         "people market government company country world music film game player season team growth bank rate "
         "minister election party police court technology phone software mobile network internet profit sales "
         "unbelievably reconstruction misunderstanding photosynthesis quarterback").split()


def make_tokenizer(path: Path, extra: tuple[str, ...] = ()) -> Path:
    """A small uncased WordPiece tokenizer (saved like an HF checkpoint): specials, single letters and their ##
    continuations, and a few whole words, so that long words split into several pieces."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + letters + [f"##{c}" for c in letters]
             + WORDS[:60] + ["##ing", "##ed", "##ly", "##tion", "re", "un", *extra])
    words = list(dict.fromkeys(vocab))
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(str(path))
    return path


def make_corpus(path: Path, docs: int = 40, seed: int = 0, sentences: tuple[int, int] = (3, 12)) -> Path:
    """A folder of .txt documents: paragraphs of sentences of random words."""
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(*sentences))]
            paragraphs.append(" ".join(sents))
        (path / f"doc{d:04d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory, tokenizer_dir) -> Path:
    """A prepared pretraining dataset of 3 shards from a synthetic corpus (shared by the stream tests)."""
    from dtrain.data.prepare import prepare_pretrain

    root = tmp_path_factory.mktemp("pretrain")
    corpus = make_corpus(root / "corpus", docs=60)
    prepare_pretrain([str(corpus)], root / "data", str(tokenizer_dir), max_seq_len=64, workers=1,
                     shard_bytes=8 << 10)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset's BertForPreTraining (seed 0) saved as a Hugging Face checkpoint dir."""
    import torch
    from transformers import BertForPreTraining

    from dtrain.model.presets import preset_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    BertForPreTraining(preset_config("tiny")).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, tokenizer_dir):
    from dtrain.data.prepare import prepare_pretrain

    root = tmp_path_factory.mktemp("train")
    prepare_pretrain([str(make_corpus(root / "c", docs=80, seed=3))], root / "train", str(tokenizer_dir),
                     max_seq_len=64, workers=1)
    prepare_pretrain([str(make_corpus(root / "e", docs=10, seed=4))], root / "eval", str(tokenizer_dir),
                     max_seq_len=64, workers=1)
    return root


# -- the test Slurm cluster -------------------------------------------------------------------------------------
def _required() -> bool:
    """In CI (or with DTRAIN_REQUIRE_SLURM=1) the Slurm tests must run: a cluster that cannot start fails them."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return ci or os.environ.get("DTRAIN_REQUIRE_SLURM") == "1"


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"Slurm tests are required here (CI / DTRAIN_REQUIRE_SLURM=1), but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A real Slurm cluster of two namespace hosts (tests/slurm/cluster.py), started once per session and shared by
    tests/slurm and tests/multinode (installing Slurm if needed)."""
    if reason := why_unavailable():
        _unavailable(reason)
    cluster = SlurmCluster()
    try:
        try:
            cluster.start()
        except SlurmUnavailable as e:  # e.g. no network to install from; a daemon that fails to start is an error
            _unavailable(str(e))
        yield cluster
    finally:
        cluster.stop()
