"""Long documents (dtrain/data/windows.py and the tasks' pooling): how a long text is cut at prepare and predict,
the windows' spans, the per-document pooling of every sequence task, the 1/windows weighting of the loss, and the
settings' one-line errors."""

import numpy as np
import pytest
import torch

from dtrain.data.shards import ShardError
from dtrain.data.windows import Cut, allot, spans
from dtrain.errors import DtrainError
from dtrain.model.tokenizer import load_tokenizer
from dtrain.tasks import FinetuneCollator, Head, get_task
from dtrain.tasks.base import encode_rows
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def _text(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % 40] for i in range(n))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("n, room, overlap", [(0, 14, 4), (5, 14, 4), (14, 14, 4), (15, 14, 4), (100, 14, 4),
                                              (100, 14, 0), (100, 14, 13)])
def test_windows_cover_the_text_and_share_the_stride(n, room, overlap):
    parts = spans(n, room, overlap)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(hi - lo <= room for lo, hi in parts)
    for (lo1, hi1), (lo2, _) in zip(parts, parts[1:], strict=False):
        assert hi1 - lo2 == overlap and hi1 == lo1 + room  # every window but the last is full
    covered = set().union(*(range(lo, hi) for lo, hi in parts))
    assert covered == set(range(n))


def test_head_is_the_tokenizers_truncation_and_tail_and_head_tail_keep_the_ends(tok):
    text = _text(30)
    ids = _ids(tok, text)
    assert len(ids) == 30
    head = Cut().encode(tok, [text], None, 16)
    assert head["input_ids"] == encode_rows(tok, [text], None, 16)["input_ids"]  # (the plain path's output)
    tail = Cut("tail").encode(tok, [text], None, 16)["input_ids"][0]
    assert tail == [tok.cls_token_id, *ids[-14:], tok.sep_token_id]
    both = Cut("head_tail", head_share=0.25).encode(tok, [text], None, 16)["input_ids"][0]
    assert both == [tok.cls_token_id, *ids[:4], *ids[-10:], tok.sep_token_id]  # round(14 * 0.25) = 4 from the start
    short = _text(5)
    assert Cut("tail").encode(tok, [short], None, 16)["input_ids"] == head["input_ids"][:0] + \
        encode_rows(tok, [short], None, 16)["input_ids"]  # a short text is whole in every mode


def test_pairs_share_the_room_longest_first_and_types_mark_the_pair(tok):
    assert allot(30, 4, 13) == (9, 4) and allot(4, 30, 13) == (4, 9) and allot(30, 30, 13) == (7, 6)
    a, b = _text(30), _text(20, 7)
    out = Cut("tail").encode(tok, [a], [b], 16)
    ids, types = out["input_ids"][0], out["token_type_ids"][0]
    assert len(ids) == 16 and types == [0] * 9 + [1] * 7
    assert ids[1:8] == _ids(tok, a)[-7:] and ids[9:15] == _ids(tok, b)[-6:]


def test_windows_repeat_the_pair_carry_their_document_and_respect_the_cap(tok):
    texts = [_text(40), _text(3)]
    out = Cut(windows=True, stride=4).encode(tok, texts, None, 16, first=100)
    assert out["doc"] == [100, 100, 100, 100, 101] and out["windows"] == [4, 4, 4, 4, 1]
    assert out["truncated_documents"] == [0]
    first, second = out["input_ids"][0], out["input_ids"][1]
    assert first[-5:-1] == second[1:5]  # consecutive windows share 4 tokens
    capped = Cut(windows=True, stride=4, max_windows=2).encode(tok, texts, None, 16)
    assert capped["doc"] == [0, 0, 1] and capped["windows"] == [2, 2, 1] and capped["truncated_documents"] == [1]
    pair = _text(4, 9)
    paired = Cut(windows=True, stride=2).encode(tok, [_text(40)], [pair], 16)
    assert len(paired["doc"]) > 1
    for ids, types in zip(paired["input_ids"], paired["token_type_ids"], strict=True):
        assert ids[-5:-1] == _ids(tok, pair) and types[-5:] == [1] * 5 and len(ids) <= 16


@pytest.mark.parametrize("cut, pairs, message", [
    (Cut(windows=True, stride=14), False, "--doc-stride 14: consecutive windows share that many tokens, but a window "
                                          "holds 14 tokens of text at --max-seq-len 16; pass --doc-stride from 0 to "
                                          "13 (e.g. 3)"),
    (Cut(windows=True, stride=7), True, "--doc-stride 7: consecutive windows share that many tokens, but a window "
                                        "holds 7 tokens of text at --max-seq-len 16 (half is kept for the text "
                                        "pair); pass --doc-stride from 0 to 6 (e.g. 1)"),
    (Cut(windows=True, max_windows=0), False, "--max-windows 0: a document keeps at least 1 window; pass 1 or more "
                                              "(or leave it out: every window)"),
    (Cut(max_windows=2), False, "--max-windows caps the windows of --windows; add --windows or remove --max-windows"),
    (Cut("tail", windows=True), False, "--truncation tail with --windows"),
    (Cut("head_tail", head_share=1.0), False, "--head-share 1: the share of kept tokens taken from the start"),
])
def test_bad_cut_settings_are_one_line(cut, pairs, message):
    with pytest.raises(ShardError) as e:
        cut.check(16, pairs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_pooling_gives_one_output_per_document_for_every_sequence_task():
    windows = Cut(windows=True, stride=4)
    cls = get_task("classification").reading(windows)  # mean of the probabilities
    logits = np.array([[4.0, 0.0], [0.0, 0.1], [0.0, 0.2], [3.0, 0.0]])
    pooled = cls.pool_windows([(i, x, 1) for i, x in enumerate(logits)], [7, 7, 7, 9])
    assert [r[0] for r in pooled] == [0, 3] and [r[2] for r in pooled] == [1, 1]
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.allclose(np.exp(pooled[0][1]), p[:3].mean(0))
    assert np.allclose(get_task("classification").reading(windows, "max_logits").pool(logits[:3]), [4.0, 0.2])
    multi = get_task("multilabel").reading(windows, "max")
    out = multi.pool(np.array([[-2.0, 1.0], [3.0, -1.0]]))
    assert np.allclose(1 / (1 + np.exp(-out)), [1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-1.0))], atol=1e-6)
    reg = get_task("regression").reading(windows)
    assert np.allclose(reg.pool(np.array([[1.0], [2.0], [6.0]])), [3.0])
    assert np.allclose(get_task("regression").reading(windows, "max").pool(np.array([[1.0], [6.0]])), [6.0])


@pytest.mark.parametrize("task, pooling, message", [
    ("regression", "mean_logits", "task.window_pooling=mean_logits: a regression model outputs values, not logits"),
    ("ner", "max", "task.window_pooling=max: task ner has no per-document output to pool or cut"),
    ("qa", "mean", "task.window_pooling=mean: task qa has no per-document output to pool or cut"),
])
def test_pooling_where_it_is_undefined_is_refused(task, pooling, message):
    with pytest.raises(DtrainError, match="^" + message.replace("(", r"\(")):
        get_task(task).reading(Cut(), pooling)


def test_a_documents_windows_weigh_one_document_in_the_loss(tok):
    """Classification (class-weighted too), multilabel and regression: loss sum / count over windows weighed
    1/windows equals the mean over documents of each document's mean window loss."""
    samples = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "index": i, "pad": i == 3, "label": lab,
                "labels": [lab], "windows": w} for i, (lab, w) in enumerate([(0, 2), (0, 2), (1, 1), (1, 1)])]
    collate = FinetuneCollator("classification", 0, 2)
    batch = {k: torch.as_tensor(v) for k, v in collate(samples).items()}
    assert batch["weight"].tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])
    logits = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.2, 0.3], [9.0, 9.0]])
    ce = torch.nn.functional.cross_entropy(logits[:3], batch["labels"][:3], reduction="none")
    head = Head("classification")
    loss = head.loss_terms(logits, batch)["cls"] / head.counts(batch)["cls"]
    assert float(loss) == pytest.approx(float((ce[:2].mean() + ce[2]) / 2), rel=1e-6)
    weighted = Head("classification", class_weights=[1.0, 3.0], num_labels=2)
    ce_w = ce * torch.tensor([1.0, 1.0, 3.0])
    want = (ce_w[:2].mean() + ce_w[2]) / (1 + 3)  # a weighted mean over documents
    got = weighted.loss_terms(logits, batch)["cls"] / weighted.counts(batch)["cls"]
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    batch["labels"] = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    reg = Head("regression")
    values = torch.tensor([[1.5], [2.0], [1.0], [0.0]])
    se = (values[:3, 0] - batch["labels"][:3]) ** 2
    assert float(reg.loss_terms(values, batch)["mse"] / reg.counts(batch)["mse"]) == \
        pytest.approx(float((se[:2].mean() + se[2]) / 2), rel=1e-6)
    multi_batch = {k: torch.as_tensor(v) for k, v in FinetuneCollator("multilabel", 0, 2)(samples).items()}
    multi = Head("multilabel")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:3], multi_batch["labels"][:3],
                                                               reduction="none").mean(-1)
    got = multi.loss_terms(logits, multi_batch)["bce"] / multi.counts(multi_batch)["bce"]
    assert float(got) == pytest.approx(float((bce[:2].mean() + bce[2]) / 2), rel=1e-6)
