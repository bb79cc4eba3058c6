"""Evaluation metrics against hand-computed numbers: classification, multi-label, regression, entities, SQuAD."""

import json
import math

import numpy as np
import pytest

from dtrain.metrics import (
    classification_metrics,
    classification_report,
    entity_metrics,
    entity_spans,
    format_report,
    multilabel_metrics,
    normalize_answer,
    regression_metrics,
    squad_exact,
    squad_f1,
    squad_metrics,
)

# true:  cat cat cat dog dog bird
# pred:  cat dog cat dog bird bird
LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDICTIONS = np.array([0, 1, 0, 1, 2, 2])
NAMES = ["cat", "dog", "bird"]


def test_classification_report_on_a_three_class_example():
    report = classification_report(PREDICTIONS, LABELS, NAMES)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["support"] == 6
    # cat: 2 of 2 predicted right, 2 of 3 found; dog: 1 of 2, 1 of 2; bird: 1 of 2, 1 of 1
    cat, dog, bird = (report["per_class"][name] for name in NAMES)
    assert cat == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert dog == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert bird == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert report["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 59/90
    assert report["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)  # 61/90
    assert isinstance(report["support"], int) and isinstance(cat["support"], int)
    json.dumps(report)  # plain Python types only
    assert classification_metrics(PREDICTIONS, LABELS) == pytest.approx({"accuracy": 4 / 6, "macro_f1": 59 / 90})


def test_a_class_absent_from_labels_and_predictions_gets_zeros_and_counts_in_the_macro_average():
    report = classification_report(PREDICTIONS, LABELS, [*NAMES, "fish"])
    assert report["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion_matrix"][3] == [0, 0, 0, 0]
    assert [row[3] for row in report["confusion_matrix"]] == [0, 0, 0, 0]
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0) / 4)


PROBABILITIES = np.array([[0.9, 0.4, 0.2], [0.6, 0.7, 0.1], [0.3, 0.8, 0.55]])
MULTI_LABELS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]])


def test_multilabel_metrics_depend_on_the_threshold():
    exact = multilabel_metrics(PROBABILITIES, MULTI_LABELS, ["a", "b", "c"])
    assert exact["micro_f1"] == 1.0 and exact["subset_accuracy"] == 1.0 and exact["hamming_loss"] == 0.0
    # 0.35: row 0 also predicts b -> TP 5, FP 1, FN 0: P 5/6, R 1, F1 10/11; rows 1, 2 exact
    low = multilabel_metrics(PROBABILITIES, MULTI_LABELS, ["a", "b", "c"], threshold=0.35)
    assert low["micro_f1"] == pytest.approx(10 / 11)
    assert low["subset_accuracy"] == pytest.approx(2 / 3)
    assert low["hamming_loss"] == pytest.approx(1 / 9)
    # 0.65: predictions [a], [b], [b] -> TP 3, FP 0, FN 2 (row 1 a, row 2 c): P 1, R 3/5, F1 0.75; only row 0 exact
    high = multilabel_metrics(PROBABILITIES, MULTI_LABELS, ["a", "b", "c"], threshold=0.65)
    assert high["micro_f1"] == pytest.approx(0.75)
    assert high["subset_accuracy"] == pytest.approx(1 / 3)
    assert high["hamming_loss"] == pytest.approx(2 / 9)
    assert high["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert high["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2})
    assert high["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert high["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    json.dumps(high)


def test_regression_metrics_on_a_small_case():
    # errors [0, 0, 0, 6]; x - 4 = [-3, -2, -1, 6], y - 2.5 = [-1.5, -0.5, 0.5, 1.5]
    result = regression_metrics(np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert result["mse"] == pytest.approx(36 / 4)
    assert result["rmse"] == pytest.approx(3.0)
    assert result["mae"] == pytest.approx(6 / 4)
    assert result["pearson"] == pytest.approx(14 / math.sqrt(50 * 5))  # 0.885438
    assert result["spearman"] == pytest.approx(1.0)  # same order
    swapped = regression_metrics(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4]))
    assert swapped["pearson"] == pytest.approx(0.8) and swapped["spearman"] == pytest.approx(0.8)  # 4 / sqrt(5·5)


def test_a_constant_side_gives_zero_correlation_not_nan():
    result = regression_metrics(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert result["pearson"] == 0.0 and result["spearman"] == 0.0
    assert result["mse"] == pytest.approx(2 / 3)
    assert regression_metrics(np.array([1.0, 2.0]), np.array([5.0, 5.0]))["pearson"] == 0.0
    json.dumps(result)


def test_entity_spans_follow_the_conlleval_rules():
    tags = ["I-PER", "I-PER", "I-LOC", "O", "B-X", "I-X", "I-Y", "B-X", "B-X", "O", "I-X"]
    assert entity_spans(tags) == [("PER", 0, 2), ("LOC", 2, 3), ("X", 4, 6), ("Y", 6, 7), ("X", 7, 8), ("X", 8, 9),
                                  ("X", 10, 11)]
    assert entity_spans(["O", "O"]) == [] and entity_spans([]) == []
    assert entity_spans(["B-ORG-X", "I-ORG-X"]) == [("ORG-X", 0, 2)]


@pytest.mark.parametrize("bad", ["PER", "B-", "E-PER", "o"])
def test_an_invalid_tag_raises_naming_it(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        entity_spans(["O", bad])


def test_entity_metrics_with_partial_matches():
    true = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"], ["O", "B-ORG", "I-ORG", "O", "B-MISC"]]
    pred = [["B-PER", "O", "O", "B-LOC", "B-LOC", "O"], ["O", "I-ORG", "I-ORG", "O", "B-PER"]]
    # true: PER(0,2) LOC(3,4) LOC(4,5) | ORG(1,3) MISC(4,5)
    # pred: PER(0,1) LOC(3,4) LOC(4,5) | ORG(1,3) PER(4,5)  -> 3 of 5 right both ways
    result = entity_metrics(true, pred)
    assert result["precision"] == pytest.approx(0.6)
    assert result["recall"] == pytest.approx(0.6)
    assert result["f1"] == pytest.approx(0.6)
    assert result["support"] == 5
    per_type = result["per_type"]
    assert set(per_type) == {"PER", "LOC", "ORG", "MISC"}
    assert per_type["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # 0 of 2 predicted
    assert per_type["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert per_type["ORG"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per_type["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # none predicted
    json.dumps(result)


def test_entity_metrics_unequal_recall_and_precision():
    # true PER(0,1) LOC(2,3); pred PER(0,1) only -> P 1, R 1/2, F1 2/3
    result = entity_metrics([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
    assert (result["precision"], result["recall"]) == (1.0, 0.5)
    assert result["f1"] == pytest.approx(2 / 3)
    assert entity_metrics([["O"]], [["O"]])["f1"] == 0.0


def test_entity_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="sentence 1"):
        entity_metrics([["O"], ["O", "B-X"]], [["O"], ["O"]])
    with pytest.raises(ValueError):
        entity_metrics([["O"], ["O"]], [["O"]])


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("An apple, a pear and THE end.") == "apple pear and end"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert squad_exact("The  Cat!", "cat") == 1.0
    assert squad_exact("cats", "cat") == 0.0


def test_squad_f1_token_overlap():
    # "big red cat" vs "red cat sat": 2 common tokens, P = R = 2/3
    assert squad_f1("the big red cat", "red cat sat") == pytest.approx(2 / 3)
    # "red cat" vs "red cat sat": P 1, R 2/3 -> 0.8
    assert squad_f1("red cat", "the red cat sat") == pytest.approx(0.8)
    assert squad_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "") == 1.0 and squad_f1("the", "a") == 1.0  # both normalise to nothing
    assert squad_f1("", "cat") == 0.0 and squad_f1("cat", "") == 0.0


def test_squad_metrics_takes_the_best_gold_answer_and_handles_unanswerable_and_missing():
    answers = {"q1": ["cat"], "q2": ["a dog", "the red cat sat"], "q3": [], "q4": [], "q5": ["dog"]}
    predictions = {"q1": "The Cat", "q2": "red cat", "q3": "", "q4": "cat", "extra": "ignored"}
    # EM: q1 1, q2 0, q3 1, q4 0, q5 missing 0; F1: 1, 0.8 (vs the second answer), 1, 0, 0
    result = squad_metrics(predictions, answers)
    assert result["exact_match"] == pytest.approx(2 / 5)
    assert result["f1"] == pytest.approx(2.8 / 5)
    assert result["total"] == 5
    assert squad_metrics({}, {}) == {"exact_match": 0.0, "f1": 0.0, "total": 0}


def test_format_report_shows_names_numbers_and_the_confusion_matrix():
    text = format_report(classification_report(PREDICTIONS, LABELS, NAMES), title="toy")
    lines = text.splitlines()
    assert lines[0] == "toy"
    for expected in ("precision", "cat", "dog", "bird", "0.8000", "0.6667", "macro avg", "weighted avg",
                     "accuracy", "confusion matrix"):
        assert expected in text
    assert [line.split() for line in lines if line.startswith("cat ")][-1] == ["cat", "2", "1", "0"]
    assert [line.split() for line in lines if line.startswith("macro avg")][0][2:] == ["0.6667", "0.7222", "0.6556",
                                                                                       "6"]


def test_format_report_truncates_long_tables_and_matrix_names():
    names = [f"a_very_long_class_name_{i}" for i in range(60)]
    labels = np.arange(60)
    text = format_report(classification_report(labels, labels, names))
    assert "... 10 more" in text and "a_very_long_class_name_49" in text and "a_very_long_class_name_50" not in text
    assert "confusion matrix omitted" in text
    short = format_report(classification_report(np.array([0, 1]), np.array([0, 1]), names[:2]))
    assert "a_very_long_" in short.split("confusion matrix")[1]
    assert "a_very_long_class_name_0" not in short.split("confusion matrix")[1]


def test_format_report_handles_entity_and_regression_reports():
    text = format_report(entity_metrics([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]]))
    assert "PER" in text and "LOC" in text and "0.6667" in text and "confusion" not in text
    text = format_report(regression_metrics(np.array([1.0, 2.0]), np.array([1.0, 3.0])))
    assert "mse" in text and "0.5000" in text
