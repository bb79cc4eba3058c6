"""Bad inputs of the model, the labels and the sequence length, typed as a user would (issue 15, items 5-10): each
is refused with one line (exit 2), or, where the input is fine but was misread before, now read right.

- a Hub id (`bert-base-uncased`) means its pretrained weights (HF cache, or the Hub), never a random-init preset;
  random init only as `preset:NAME` / `tiny`, and then the log says so;
- a checkpoint that is not BERT, and a tokenizer dir without a vocabulary, are refused;
- labels.json is read by id (a mapping) and checked against the shards it was written with;
- label sets that cannot train and one-document corpora are refused at `prepare`;
- sequence lengths: at least 8, at most the model's, at prepare and at run start; pretraining data cut by a shorter
  data.max_seq_len trains with a warning that gives the share of tokens dropped; `--workers` at least 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, WORDS, make_corpus, make_tokenizer, run_cli

OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **OFFLINE, **(env or {})}, stdin=subprocess.DEVNULL, timeout=600)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**OFFLINE, **(env or {})})


def ft(data: Path, tokenizer: Path, run_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("--config", "configs/finetune/debug.yaml", f"data.train={data}", "data.eval=null", "data.test=null",
            f"model.tokenizer={tokenizer}", f"run_dir={run_dir}", "data.max_seq_len=32", "schedule.max_steps=1",
            "logging.progress_bar=false", "logging.tensorboard=false", *extra)


def pt(data: Path, tokenizer: Path, run_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("--config", "configs/pretrain/debug.yaml", f"data.train={data}", "data.eval=null",
            f"model.tokenizer={tokenizer}", f"run_dir={run_dir}", "schedule.max_steps=1", "logging.progress_bar=false",
            "logging.tensorboard=false", *extra)


def error(result: subprocess.CompletedProcess) -> str:
    """The one error line: the last of stderr, exit status 2, no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert lines and lines[-1].startswith("dtrain: error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tokenizer_dir) -> Path:
    """A prepared classification set: 10 pos, 6 neg (labels.json: ["neg", "pos"], counts 6 and 10)."""
    from dtrain.tasks import prepare_finetune

    root = tmp_path_factory.mktemp("labelled")
    rows = [{"text": "the market growth", "label": "pos"}] * 10 + [{"text": "the police court", "label": "neg"}] * 6
    prepare_finetune([str(write_rows(root / "rows.jsonl", rows))], root / "train", str(tokenizer_dir), max_seq_len=32,
                     workers=1)
    return root / "train"


def edited(labelled: Path, root: Path, labels) -> Path:  # noqa: ANN001
    copy = Path(shutil.copytree(labelled, root / "train"))
    data = json.loads((copy / "labels.json").read_text())
    (copy / "labels.json").write_text(json.dumps({**data, "labels": labels}))
    return copy


def hub_cache(root: Path, repo: str) -> Path:
    """An HF hub cache holding a tiny BERT (and a tokenizer) as the snapshot of `repo`."""
    from transformers import BertForPreTraining

    from dtrain.model.presets import preset_config

    cache = root / "hf-cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(5)
    BertForPreTraining(preset_config("tiny")).save_pretrained(str(snapshot))
    make_tokenizer(snapshot)
    return cache


# -- item 5: a Hub id means pretrained weights; random init only on request -------------------------------------------


def test_a_hub_id_means_pretrained_weights_and_random_init_is_asked_for(pretrain_data, tokenizer_dir, tmp_path):
    # not in the HF cache, the Hub unreachable: one line that says so and how to fix it (before: a random BERT-base)
    empty = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    line = error(train("dtrain.pretrain", *pt(pretrain_data, tokenizer_dir, tmp_path / "a",
                                               "model.name_or_path=bert-base-uncased"), env=empty))
    assert line == (f"dtrain: error: model.name_or_path=bert-base-uncased: no such local dir, not in the Hugging Face "
                    f"cache ({tmp_path / 'empty-cache'}), and the Hub is not reachable (HF_HUB_OFFLINE=1); download "
                    f"it where there is network (`hf download bert-base-uncased`, then copy the cache or set "
                    f"HF_HUB_CACHE), point model.name_or_path at a local checkpoint dir, or write "
                    f"preset:bert-base-uncased for a randomly initialised model of that shape")
    assert not (tmp_path / "a").exists()
    # in the HF cache: its weights, every one of them, and the log says where they come from
    cache = hub_cache(tmp_path, "bert-base-uncased")
    ok = train("dtrain.pretrain", *pt(pretrain_data, tokenizer_dir, tmp_path / "b",
                                      "model.name_or_path=bert-base-uncased"), env={"HF_HUB_CACHE": str(cache)})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "dtrain: model bert-base-uncased: all weights loaded from the checkpoint" in ok.stderr
    assert "dtrain: model: pretrained weights from bert-base-uncased" in ok.stderr
    # random init only when asked for, and then said
    rand = train("dtrain.pretrain", *pt(pretrain_data, tokenizer_dir, tmp_path / "c", "model.name_or_path=preset:tiny"))
    assert rand.returncode == 0, rand.stderr[-3000:]
    assert "dtrain: model: random init of preset tiny (no pretrained weights)" in rand.stderr
    line = error(train("dtrain.pretrain", *pt(pretrain_data, tokenizer_dir, tmp_path / "d",
                                               "model.name_or_path=preset:bert-huge")))
    assert line.startswith("dtrain: error: model.name_or_path=preset:bert-huge: no preset 'bert-huge'; the "
                           "random-init presets are preset:tiny, preset:bert-base-uncased, ")


def test_the_origin_of_a_model_is_recorded():
    from dtrain.model.source import origin, origin_line

    assert origin("preset:bert-large-uncased") == {"name_or_path": "preset:bert-large-uncased", "init": "random",
                                                   "preset": "bert-large-uncased"}
    assert origin("tiny")["init"] == "random" and origin("bert-large-uncased")["init"] == "pretrained"
    assert origin_line("preset:bert-base-cased") == ("model: random init of preset bert-base-cased (no pretrained "
                                                     "weights)")


# -- item 6: not a BERT checkpoint, a tokenizer without a vocabulary --------------------------------------------------


def test_a_checkpoint_that_is_not_bert_is_refused(labelled, tokenizer_dir, tmp_path):
    from transformers import BertForPreTraining, GPT2Config, GPT2LMHeadModel

    from dtrain.errors import DtrainError
    from dtrain.model.bert import pretraining_model

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=200)).save_pretrained(str(gpt2))
    make_tokenizer(gpt2)  # BERT tokenizer files beside it, as in the issue
    line = error(train("dtrain.finetune", *ft(labelled, tokenizer_dir, tmp_path / "run",
                                              f"model.name_or_path={gpt2}")))
    assert line == (f"dtrain: error: {gpt2}/config.json: model_type 'gpt2' (GPT2LMHeadModel) is not BERT; dtrain "
                    f"trains BERT models (model_type bert: BERT, MiniLM and other BERT-architecture checkpoints); "
                    f"point model.name_or_path at a BERT checkpoint")
    assert not (tmp_path / "run").exists()
    # a BERT config.json over weights without a BERT encoder: refused too, not a random BERT
    from dtrain.model.presets import preset_config

    BertForPreTraining(preset_config("tiny")).config.save_pretrained(str(gpt2))
    with pytest.raises(DtrainError, match=r"config\.json says BERT, but the weights have no BERT encoder "
                                          r"\(embeddings\.word_embeddings\.weight missing; it holds transformer\."):
        pretraining_model(str(gpt2))


def test_a_tokenizer_dir_without_a_vocabulary_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(str(tmp_path / "tok"))
    corpus = make_corpus(tmp_path / "corpus", docs=4)
    line = error(cli("prepare", "pretrain", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer",
                     str(tmp_path / "tok"), "--workers", "1"))
    assert line == (f"dtrain: error: tokenizer {tmp_path / 'tok'}: no tokenizer files in the dir (none of "
                    f"tokenizer.json, vocab.txt, vocab.json ...), so every word would be [UNK]; pass the dir of a "
                    f"checkpoint that includes its tokenizer (e.g. the minilm example from `dtrain fetch-examples`)")
    assert not (tmp_path / "out").exists()


# -- item 7: labels.json read by id and checked against the shards ----------------------------------------------------


def test_labels_json_is_read_by_id_and_checked_against_the_shards(labelled, tmp_path):
    from dtrain.data.shards import ShardError
    from dtrain.tasks import LabelMap

    def load(name: str, labels) -> list[str]:  # noqa: ANN001
        return LabelMap.load(edited(labelled, tmp_path / name, labels)).labels

    assert LabelMap.load(labelled).labels == ["neg", "pos"]
    assert load("by-name", {"pos": 1, "neg": 0}) == ["neg", "pos"]  # by id, not in key order
    assert load("by-id", {"1": "pos", "0": "neg"}) == ["neg", "pos"]
    cases = {"clash": ({"pos": 1, "neg": 1}, r"label ids \[1, 1\] are not 0\.\.1, each once"),
             "gap": ({"pos": 2, "neg": 0}, r"label ids \[0, 2\] are not 0\.\.1, each once"),
             "extra": (["neg", "unused", "pos"], r"lists 3 labels \(neg, unused, pos\), but the dataset was prepared "
                                                 r"with 2 \(manifest\.json num_labels\)"),
             "fewer": (["neg"], r"lists 1 labels \(neg\), but the dataset was prepared with 2"),
             "swapped": (["pos", "neg"], r"label 'pos' has id 0, but the shards hold 6 examples with id 0 and "
                                         r"labels\.json counts 10 'pos'"),
             "twice": (["neg", "neg"], r"labels \['neg'\] appear twice")}
    for name, (labels, message) in cases.items():
        with pytest.raises(ShardError, match=message):
            load(name, labels)


def test_a_run_refuses_a_labels_json_that_renumbers_the_labels(labelled, tokenizer_dir, tmp_path):
    data = edited(labelled, tmp_path, ["neg", "unused", "pos"])
    line = error(train("dtrain.finetune", *ft(data, tokenizer_dir, tmp_path / "run")))
    assert line == (f"dtrain: error: {data}/labels.json lists 3 labels (neg, unused, pos), but the dataset was "
                    f"prepared with 2 (manifest.json num_labels); restore the labels.json that `dtrain prepare "
                    f"finetune` wrote, or prepare the data again")
    assert not (tmp_path / "run").exists()


# -- item 8: label sets that cannot train, at prepare -----------------------------------------------------------------


def test_label_sets_that_cannot_train_are_refused_at_prepare(tokenizer_dir, tmp_path):
    def prepare(kind: str, source: Path, *extra: str) -> str:
        out = tmp_path / f"out-{source.stem}"
        line = error(cli("prepare", kind, str(source), "--out", str(out), "--tokenizer", str(tokenizer_dir),
                         "--workers", "1", *extra))
        assert not out.exists()
        return line

    mixed = write_rows(tmp_path / "mixed.jsonl", [{"text": "the market", "label": v} for v in ("pos", 1, "neg", 0)])
    assert prepare("finetune", mixed) == (
        f"dtrain: error: {mixed} line 2: label '1' is a number, but {mixed} line 1 has the name 'pos': labels that "
        f"mix numbers (0, 1) and names (neg, pos) become 4 separate classes; give every row a name or every row a "
        f"number")
    one = write_rows(tmp_path / "one.jsonl", [{"text": "the market", "label": "pos"}] * 5)
    assert prepare("finetune", one) == (
        f"dtrain: error: {one}: all 5 examples have the label 'pos', but a classifier needs two classes at least; "
        f"add examples of the other class(es) (a dev/test set: prepare it with --labels <train dir>)")
    only_o = tmp_path / "only_o.conll"
    only_o.write_text("the\tO\nteam\tO\n\nthe\tO\n")
    assert prepare("finetune", only_o) == (f"dtrain: error: {only_o}: every tag is O, so there is no entity to learn; "
                                           f"add sentences with B-/I- tags (a dev/test set: prepare it with --labels "
                                           f"<train dir>)")
    single = make_corpus(tmp_path / "single", docs=1)
    assert prepare("pretrain", single) == (
        f"dtrain: error: {single}: one document only, but NSP pairs need a segment of another document; add "
        f"documents (or --doc-split blank-line if blank lines separate the documents of a file)")
    # a dev set prepared with the training set's labels may hold one class
    dev = write_rows(tmp_path / "dev.jsonl", [{"text": "the market", "label": "pos"}] * 3)
    labels = write_rows(tmp_path / "labels.json", [])
    labels.write_text(json.dumps({"task": "classification", "labels": ["neg", "pos"]}))
    ok = cli("prepare", "finetune", str(dev), "--out", str(tmp_path / "dev"), "--tokenizer", str(tokenizer_dir),
             "--workers", "1", "--labels", str(labels))
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_one_class_model_is_one_line_not_a_problem_type_traceback():
    from dtrain.errors import DtrainError
    from dtrain.tasks import task_model

    with pytest.raises(DtrainError, match=r"has 1 label\(s\) \['pos'\], but a classifier needs two classes at least"):
        task_model("classification", "tiny", ["pos"])


# -- item 9: sequence-length and worker bounds ------------------------------------------------------------------------


def test_sequence_length_and_worker_bounds_at_prepare(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    bounded = tmp_path / "bounded"  # the test vocabulary with model_max_length 512, as BERT's tokenizers have
    AutoTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=512).save_pretrained(str(bounded))
    rows = write_rows(tmp_path / "rows.jsonl", [{"text": "the market", "label": v} for v in ("pos", "neg") * 3])
    corpus = make_corpus(tmp_path / "corpus", docs=4)

    def prepare(kind: str, source: Path, tokenizer: Path, *extra: str) -> str:
        line = error(cli("prepare", kind, str(source), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer),
                         *extra))
        assert not (tmp_path / "out").exists()
        return line

    for kind, source in (("finetune", rows), ("pretrain", corpus)):
        for n in ("0", "-1", "7"):
            assert prepare(kind, source, tokenizer_dir, "--max-seq-len", n, "--workers", "1") == (
                f"dtrain: error: --max-seq-len {n}: must be at least 8 (room for [CLS], [SEP] and some text); BERT "
                f"data is usually prepared at 128 or 512")
        for n in ("4000", "100000"):
            assert prepare(kind, source, bounded, "--max-seq-len", n, "--workers", "1") == (
                f"dtrain: error: --max-seq-len {n}: longer than the model of tokenizer {bounded} takes (512 tokens, "
                f"its model_max_length); use --max-seq-len 512 or less")
        for n in ("0", "-3"):
            assert prepare(kind, source, tokenizer_dir, "--workers", n) == (
                f"dtrain: error: --workers {n}: must be at least 1 (1 tokenizes in this process; leave it out for one "
                f"process per core, at most 8)")
    ok = cli("prepare", "finetune", str(rows), "--out", str(tmp_path / "ok"), "--tokenizer", str(bounded),
             "--max-seq-len", "512", "--workers", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory, tokenizer_dir) -> Path:
    """Fine-tuning rows of 600 words (602 tokens), prepared at 1000 with a tokenizer that knows no limit."""
    from dtrain.tasks import prepare_finetune

    root = tmp_path_factory.mktemp("long_rows")
    text = " ".join(WORDS[i % 60] for i in range(600))
    rows = write_rows(root / "rows.jsonl", [{"text": text, "label": v} for v in ("pos", "neg") * 4])
    prepare_finetune([str(rows)], root / "train", str(tokenizer_dir), max_seq_len=1000, workers=1)
    return root / "train"


@pytest.fixture(scope="module")
def long_chunks(tmp_path_factory, tokenizer_dir) -> Path:
    """Pretraining chunks of up to 1024 tokens (long documents prepared at --max-seq-len 1024)."""
    from dtrain.data.prepare import prepare_pretrain

    root = tmp_path_factory.mktemp("long_chunks")
    corpus = make_corpus(root / "corpus", docs=6, sentences=(60, 80))
    prepare_pretrain([str(corpus)], root / "data", str(tokenizer_dir), max_seq_len=1024, workers=1)
    return root / "data"


def test_sequence_lengths_beyond_the_model_are_refused_at_run_start(long_rows, long_chunks, tokenizer_dir, tmp_path):
    # fine-tuning rows of 602 tokens on a model of 512 positions: one line at start (before: a tensor-size traceback)
    line = error(train("dtrain.finetune", *ft(long_rows, tokenizer_dir, tmp_path / "ft")))
    assert line == (f"dtrain: error: data.train={long_rows} holds sequences of up to 602 tokens (prepared with "
                    f"--max-seq-len 1000), but the model takes at most 512 (max_position_embeddings); prepare it "
                    f"again with --max-seq-len 512 or less")
    # pretraining at data.max_seq_len=1024 on chunks that long
    line = error(train("dtrain.pretrain", *pt(long_chunks, tokenizer_dir, tmp_path / "pt", "data.max_seq_len=1024")))
    assert line == ("dtrain: error: data.max_seq_len=1024: longer than the model takes (512 positions, "
                    "max_position_embeddings) and data.train holds sequences that long; set data.max_seq_len=512 or "
                    "less")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "pt").exists()


def test_pretraining_data_cut_by_a_shorter_max_seq_len_trains_with_a_warning(long_chunks, tokenizer_dir, tmp_path):
    import numpy as np

    from dtrain.data.shards import ShardedDataset

    lengths = ShardedDataset(long_chunks).column("length").astype(np.int64)
    share = np.maximum(lengths - 61, 0).sum() / lengths.sum()
    result = train("dtrain.pretrain", *pt(long_chunks, tokenizer_dir, tmp_path / "run", "data.max_seq_len=64"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"dtrain: warning: data.train={long_chunks} was prepared with --max-seq-len 1024, data.max_seq_len=64 "
            f"cuts every sequence to 64 tokens: {share:.1%} of its tokens are never trained on; prepare it with "
            f"--max-seq-len 64 (or raise data.max_seq_len)") in result.stderr.splitlines()
    assert share > 0.5
