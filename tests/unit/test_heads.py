"""Task heads: loss normalisation, task resolution, QA span decoding, label-map growth for continued fine-tuning."""

import numpy as np
import pytest
import torch

from dtrain.errors import DtrainError
from dtrain.model.bert import IGNORE
from dtrain.model.heads import grow_head as _grow_head
from dtrain.tasks import Head, resolve_task, task_model
from dtrain.tasks.qa import best_spans, decode_answer


def test_weighted_classification_loss_is_the_weighted_mean():
    head = Head("classification", class_weights=[1.0, 3.0], num_labels=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"labels": torch.tensor([0, 1, IGNORE])}
    total = head.loss_terms(logits, batch)["cls"] / head.counts(batch)["cls"]
    expected = torch.nn.functional.cross_entropy(logits[:2], batch["labels"][:2], weight=torch.tensor([1.0, 3.0]))
    assert float(total) == pytest.approx(float(expected))
    assert float(head.counts(batch)["cls"]) == 4.0


def test_multilabel_regression_and_qa_losses_skip_padding_rows():
    ml = Head("multilabel")
    batch = {"labels": torch.tensor([[1.0, 0.0], [IGNORE, IGNORE]])}
    logits = torch.tensor([[0.0, 0.0], [50.0, -50.0]])
    assert float(ml.loss_terms(logits, batch)["bce"]) == pytest.approx(2 * np.log(2))
    assert int(ml.counts(batch)["bce"]) == 2
    reg = Head("regression")
    batch = {"labels": torch.tensor([1.0, float("nan")])}
    assert float(reg.loss_terms(torch.tensor([[3.0], [9.0]]), batch)["mse"]) == pytest.approx(4.0)
    qa = Head("qa")
    batch = {"start_position": torch.tensor([1, IGNORE]), "end_position": torch.tensor([2, IGNORE]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    logits = torch.zeros(2, 4, 2)
    assert float(qa.loss_terms(logits, batch)["span"]) == pytest.approx(np.log(4))
    batch["attention_mask"][0, 3] = 0  # padding is no answer: out of the softmax, whatever its logit
    logits[0, 3] = 50.0
    assert float(qa.loss_terms(logits, batch)["span"]) == pytest.approx(np.log(3))
    assert int(qa.counts(batch)["span"]) == 1


def test_class_weights_are_checked():
    with pytest.raises(DtrainError, match="task.class_weights has 3 values but the task has 2 labels"):
        Head("classification", class_weights=[1, 2, 3], num_labels=2)
    with pytest.raises(DtrainError, match="applies to classification, not ner"):
        Head("ner", class_weights=[1, 2], num_labels=2)


def test_resolve_task_accepts_aliases_and_names_the_mismatch():
    assert resolve_task(None, "pair", "x") == "pair"
    assert resolve_task("classification", "pair", "x") == "pair"
    assert resolve_task("token_classification", "ner", "x") == "ner"
    assert resolve_task("question_answering", "qa", "x") == "qa"
    with pytest.raises(DtrainError, match="task.type=regression, but d/labels.json was prepared for task 'ner'"):
        resolve_task("regression", "ner", "d/labels.json")


def test_best_spans_respect_context_order_and_length():
    start = np.array([9.0, 1.0, 5.0, 0.0, 4.0])
    end = np.array([9.0, 0.0, 1.0, 6.0, 3.0])
    context = np.array([False, True, True, True, True])  # [CLS] is not context
    spans = best_spans(start, end, context, n_best=5, max_answer_length=2)
    assert spans[0] == (11.0, 2, 3)  # start 2 (5) + end 3 (6)
    assert all(s <= e < s + 2 for _, s, e in spans)
    assert best_spans(start, end, context, 5, 1)[0] == (7.0, 4, 4)


def test_decode_answer_picks_the_best_window_and_maps_characters():
    context = "alpha beta gamma delta"
    w1 = {"start": np.array([0.0, 5.0, 0.0]), "end": np.array([0.0, 0.0, 4.0]),
          "offset_start": [-1, 0, 6], "offset_end": [-1, 5, 10]}
    w2 = {"start": np.array([0.0, 9.0]), "end": np.array([0.0, 9.0]), "offset_start": [-1, 11],
          "offset_end": [-1, 16]}
    assert decode_answer([w1, w2], context, 20, 30, allow_null=False)[0] == "gamma"
    assert decode_answer([w1], context, 20, 30, allow_null=False)[0] == "alpha beta"
    null = {"start": np.array([99.0, 0.0]), "end": np.array([99.0, 0.0]), "offset_start": [-1, 0],
            "offset_end": [-1, 5]}
    assert decode_answer([null], context, 20, 30, allow_null=True)[0] == ""


def test_grow_head_keeps_old_rows_and_adds_fresh_ones():
    model, _ = task_model("classification", "tiny", ["neg", "pos"])
    old_w = model.classifier.weight.detach().clone()
    grown, fresh = _grow_head(model, ["neg", "pos"], ["pos", "neutral", "neg"])
    assert torch.equal(grown.classifier.weight[0], old_w[1]) and torch.equal(grown.classifier.weight[2], old_w[0])
    assert grown.config.id2label == {0: "pos", 1: "neutral", 2: "neg"} and grown.num_labels == 3
    assert "neutral" in fresh[0]
