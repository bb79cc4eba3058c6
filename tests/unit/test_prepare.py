"""`dtrain prepare`: inputs, atomicity, determinism, fine-tuning features, and one-line errors on bad input."""

import json

import datasets
import numpy as np
import pytest

from dtrain.data import IGNORE
from dtrain.data.prepare import prepare_pretrain
from dtrain.data.shards import ShardedDataset, ShardError
from dtrain.model.tokenizer import load_tokenizer
from dtrain.tasks import FinetuneCollator, LabelMap, prepare_finetune
from tests.conftest import make_corpus


def pre(inputs, out, tok, **kw):
    return prepare_pretrain([str(i) for i in inputs], out, str(tok), max_seq_len=kw.pop("max_seq_len", 64),
                            workers=kw.pop("workers", 1), **kw)


def shard_digests(path):
    return [s["sha256"] for s in json.loads((path / "manifest.json").read_text())["shards"]]


def test_pretrain_chunks_keep_sentences_and_fit(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "c", docs=30)
    manifest = pre([corpus], tmp_path / "d", tokenizer_dir, shard_bytes=4 << 10)
    data = ShardedDataset(tmp_path / "d", verify="full")
    assert manifest["documents"] == 30 and len(manifest["shards"]) > 1
    assert manifest["tokenizer"]["fingerprint"] and manifest["max_seq_len"] == 64
    assert manifest["prepare"]["inputs"] == [str(corpus)]
    docs = set()
    for i in range(len(data)):
        row = data[i]
        assert 1 <= row["length"] <= 61 and row["length"] == len(row["input_ids"])
        assert row["sentence_ends"][-1] == row["length"] and np.all(np.diff(row["sentence_ends"]) > 0)
        docs.add(int(row["doc"]))
    assert docs == set(range(30))
    assert manifest["total_tokens"] == int(data.column("length").sum())


def test_output_does_not_depend_on_worker_count(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "c", docs=100)
    pre([corpus], tmp_path / "one", tokenizer_dir, workers=1, shard_bytes=8 << 10)
    pre([corpus], tmp_path / "two", tokenizer_dir, workers=2, shard_bytes=8 << 10)
    assert shard_digests(tmp_path / "one") == shard_digests(tmp_path / "two")


def test_jsonl_hf_datasets_and_blank_line_documents(tmp_path, tokenizer_dir):
    texts = ["The market rate was new. The bank had growth.", "Music film game. The team season was first."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    m = pre([tmp_path / "docs.jsonl"], tmp_path / "a", tokenizer_dir, text_field="body")
    assert m["documents"] == 2 and m["sentences"] == 4
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    m = pre([tmp_path / "hf"], tmp_path / "b", tokenizer_dir)
    assert m["documents"] == 2
    (tmp_path / "wiki.txt").write_text("\n\n".join(texts) + "\n")
    assert pre([tmp_path / "wiki.txt"], tmp_path / "c", tokenizer_dir, doc_split="blank-line")["documents"] == 2
    with pytest.raises(ShardError, match=r"wiki\.txt: one document only, but NSP pairs need a segment of another "
                                         r"document; add documents \(or --doc-split blank-line"):
        pre([tmp_path / "wiki.txt"], tmp_path / "d", tokenizer_dir)  # as one document: nothing to pair it with


def test_refuses_existing_dir_and_overwrite_replaces_only_when_done(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "c", docs=5)
    first = pre([corpus], tmp_path / "d", tokenizer_dir)
    with pytest.raises(ShardError, match=r"d already exists and is not empty; choose another output dir or pass "
                                         r"--overwrite"):
        pre([corpus], tmp_path / "d", tokenizer_dir)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe binary \x00\x01")
    with pytest.raises(ShardError):  # a failing overwrite leaves the earlier dataset untouched
        pre([corpus, tmp_path / "bad.txt"], tmp_path / "d", tokenizer_dir, overwrite=True)
    assert shard_digests(tmp_path / "d") == [s["sha256"] for s in first["shards"]]
    pre([make_corpus(tmp_path / "c2", docs=7, seed=9)], tmp_path / "d", tokenizer_dir, overwrite=True)
    assert ShardedDataset(tmp_path / "d").manifest["documents"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "c", "c2", "d"]  # no temp dirs left


def test_interrupted_prepare_leaves_nothing_that_looks_like_a_dataset(tmp_path, tokenizer_dir, monkeypatch):
    import dtrain.data.prepare as prep

    corpus = make_corpus(tmp_path / "c", docs=80)
    real = prep.ShardWriter.write
    calls = []

    def interrupted(self, cols):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, cols)

    monkeypatch.setattr(prep.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pre([corpus], tmp_path / "d", tokenizer_dir, shard_bytes=1 << 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("content, message", [
    (None, r"no text found in .*: the corpus is empty"),
    (b"\x00\x01\x02binary", r"empty\.txt: looks binary \(NUL bytes\), not text; remove it from the input"),
    ("caf\xe9 latin-1".encode("latin-1"), r"empty\.txt: not UTF-8 text \(bad byte at offset 3\); convert it to UTF-8"),
])
def test_bad_corpus(tmp_path, tokenizer_dir, content, message):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_bytes(content if content is not None else b"\n\n  \n")
    with pytest.raises(ShardError, match=message):
        pre([tmp_path / "c"], tmp_path / "d", tokenizer_dir)
    assert not (tmp_path / "d").exists()


# -- fine-tuning ----------------------------------------------------------------------------------------------------


def test_classification_csv_and_dev_set_with_the_training_labels(tmp_path, tokenizer_dir):
    (tmp_path / "train.csv").write_text("text,label\nthe film was new,pos\nthe bank had growth,neg\n"
                                        '"a team, a season",pos\n')
    m = prepare_finetune([str(tmp_path / "train.csv")], tmp_path / "train", str(tokenizer_dir), workers=1)
    assert (m["task"], m["rows"], m["num_labels"]) == ("classification", 3, 2)
    labels = json.loads((tmp_path / "train" / "labels.json").read_text())
    assert labels["labels"] == ["neg", "pos"] and labels["counts"] == {"neg": 1, "pos": 2}
    data = ShardedDataset(tmp_path / "train")
    assert [int(data.get(i, "label")) for i in range(3)] == [1, 0, 1]
    (tmp_path / "dev.csv").write_text("text,label\nthe market,neg\nthe party,neutral\n")
    with pytest.raises(ShardError, match=r"dev\.csv line 3: label 'neutral' is not in .*labels\.json \(known: neg, "
                                         r"pos\); fix the label"):
        prepare_finetune([str(tmp_path / "dev.csv")], tmp_path / "dev", str(tokenizer_dir),
                         labels=str(tmp_path / "train"), workers=1)
    assert not (tmp_path / "dev").exists()


def test_csv_without_label_column_or_value(tmp_path, tokenizer_dir):
    (tmp_path / "a.csv").write_text("text,stars\nthe film,5\n")
    with pytest.raises(ShardError, match=r"a\.csv: no column 'label' in the header \(columns: text, stars\); rename "
                                         r"the column or pass --label-field"):
        prepare_finetune([str(tmp_path / "a.csv")], tmp_path / "d", str(tokenizer_dir), workers=1)
    (tmp_path / "b.csv").write_text("text,label\nthe film,pos\nthe bank\n")
    with pytest.raises(ShardError, match=r"b\.csv line 3: no value for 'label'; every row needs 'text' and 'label'"):
        prepare_finetune([str(tmp_path / "b.csv")], tmp_path / "d", str(tokenizer_dir), workers=1)


def test_pairs_multilabel_and_regression(tmp_path, tokenizer_dir):
    (tmp_path / "p.tsv").write_text("premise\thypothesis\tlabel\nthe film\tthe game\tyes\nthe bank\tthe rate\tno\n")
    m = prepare_finetune([str(tmp_path / "p.tsv")], tmp_path / "p", str(tokenizer_dir), text_field="premise",
                         text_pair_field="hypothesis", workers=1)
    row = ShardedDataset(tmp_path / "p")[0]
    assert m["task"] == "pair" and row["token_type_ids"].tolist().count(1) == 3  # "the game [SEP]"
    (tmp_path / "m.jsonl").write_text('{"text": "the film", "label": ["music", "film"]}\n'
                                      '{"text": "the bank", "label": ["market"]}\n')
    m = prepare_finetune([str(tmp_path / "m.jsonl")], tmp_path / "m", str(tokenizer_dir), workers=1)
    assert m["task"] == "multilabel" and m["num_labels"] == 3
    assert ShardedDataset(tmp_path / "m")[0]["labels"].tolist() == [2, 0]  # film, market, music → ids
    (tmp_path / "r.jsonl").write_text('{"text": "the film", "label": 2.5}\n{"text": "the bank", "label": -1.0}\n')
    m = prepare_finetune([str(tmp_path / "r.jsonl")], tmp_path / "r", str(tokenizer_dir), workers=1)
    assert m["task"] == "regression" and ShardedDataset(tmp_path / "r").column("label").tolist() == [2.5, -1.0]


def test_ner_conll_labels_first_piece_of_each_word(tmp_path, tokenizer_dir):
    (tmp_path / "train.conll").write_text("the\tO\nphotosynthesis\tB-ORG\nbank\tI-ORG\nof\tO\nmarket\tB-LOC\n\n"
                                          "police\tB-PER\n\n")
    m = prepare_finetune([str(tmp_path / "train.conll")], tmp_path / "n", str(tokenizer_dir), workers=1)
    labels = LabelMap.load(tmp_path / "n")
    assert m["task"] == "ner" and labels.labels[0] == "O"
    row = ShardedDataset(tmp_path / "n")[0]
    tok = load_tokenizer(tokenizer_dir)
    words, tags = ["the", "photosynthesis", "bank", "of", "market"], ["O", "B-ORG", "I-ORG", "O", "B-LOC"]
    expected = [None]
    for word, tag in zip(words, tags, strict=True):
        expected += [tag] + [None] * (len(tok.tokenize(word)) - 1)
    expected.append(None)
    assert len(tok.tokenize("photosynthesis")) > 5  # the long word really is split into pieces
    assert [labels.labels[t] if t != IGNORE else None for t in row["labels"]] == expected


def test_finetune_collator_pads_to_the_batch_not_to_max_len():
    samples = [{"input_ids": np.arange(n) + 5, "token_type_ids": np.zeros(n, np.int8), "length": n, "label": n % 2,
                "index": n, "pad": n == 9} for n in (3, 9, 12)]
    batch = FinetuneCollator("classification", pad_id=0)(samples)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 9, 12]
    assert batch["labels"].tolist() == [1, IGNORE, 0]


def squad(context, qas):
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_qa_windows_carry_the_answer_span_and_offsets(tmp_path, tokenizer_dir):
    words = ["the", "market", "rate", "was", "new", "and", "the", "bank", "had", "growth"] * 6
    context = " ".join(words) + " the police court was first ."
    start = context.index("police court")
    qas = [{"id": "q1", "question": "who was first", "answers": [{"text": "police court", "answer_start": start}]},
           {"id": "q2", "question": "the film", "answers": [], "is_impossible": True}]
    (tmp_path / "train.json").write_text(json.dumps(squad(context, qas)))
    m = prepare_finetune([str(tmp_path / "train.json")], tmp_path / "qa", str(tokenizer_dir), task="qa",
                         max_seq_len=32, doc_stride=8, workers=1)
    data = ShardedDataset(tmp_path / "qa")
    assert m["task"] == "qa" and len(data) > 4  # long context → several overlapping windows per question
    tok = load_tokenizer(tokenizer_dir)
    examples = [json.loads(line) for line in (tmp_path / "qa" / "examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == ["q1", "q2"]
    found = 0
    for i in range(len(data)):
        row = data[i]
        s, e = int(row["start_position"]), int(row["end_position"])
        if int(row["example"]) == 1 or s == 0:
            assert (s, e) == (0, 0)
            continue
        found += 1
        assert tok.decode(row["input_ids"][s:e + 1]) == "police court"
        assert context[row["offset_start"][s]:row["offset_end"][e]] == "police court"
        assert row["offset_start"][0] == -1  # [CLS] and the question are not context
    assert found >= 1
    (tmp_path / "bad.json").write_text(json.dumps(squad(context, [{"id": "q9", "question": "x", "answers": [
        {"text": "police court", "answer_start": start + 1}]}])))
    with pytest.raises(ShardError, match=r"bad\.json: question q9: answer 'police court' is not at answer_start"):
        prepare_finetune([str(tmp_path / "bad.json")], tmp_path / "bad", str(tokenizer_dir), task="qa", workers=1)
    batch = FinetuneCollator("qa", pad_id=0)([data[0] | {"index": 0, "pad": False}, data[1] | {"index": 1,
                                                                                               "pad": True}])
    assert batch["start_position"][1] == IGNORE and batch["example"].tolist() == [int(data[0]["example"]),
                                                                                   int(data[1]["example"])]
