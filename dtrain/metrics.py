"""Evaluation metrics for the fine-tuning tasks: numpy in, plain (JSON-serialisable) floats/lists/dicts out.

Values are fractions in [0, 1]. scikit-learn / scipy do the counting; entity spans (conlleval/seqeval default mode)
and SQuAD answer normalisation (the official v1.1/v2.0 scripts) are written here.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_TABLE_ROWS = 50  # per_class / per_type rows shown by `format_report`
_MATRIX_CLASSES = 50  # larger confusion matrices are not printed
_MATRIX_NAME = 12  # confusion-matrix header names are truncated to this many characters
_PUNCTUATION = frozenset(string.punctuation)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Multi-label probabilities from logits (evaluation and predict)."""
    return 1 / (1 + np.exp(-x))


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 of predicted class ids; {} when there are no labels."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(labels) == 0:
        return {}
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}


def _per_class(names: list[str], precision, recall, f1, support) -> dict[str, dict[str, float | int]]:
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)}


def classification_report(predictions: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Single-label report over classes ``range(len(names))``: averages, per-class numbers, confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    ids = list(range(len(names)))
    if len(labels) == 0:
        zeros = [0.0] * len(names)
        per_class = _per_class(names, zeros, zeros, zeros, [0] * len(names))
        matrix = [[0] * len(names) for _ in names]
        return {"accuracy": 0.0, "macro_f1": 0.0, "weighted_f1": 0.0, "macro_precision": 0.0, "macro_recall": 0.0,
                "weighted_precision": 0.0, "weighted_recall": 0.0, "per_class": per_class,
                "confusion_matrix": matrix, "support": 0}
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=ids, average=None, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(labels, predictions, labels=ids, average="macro", zero_division=0)
    wp, wr, wf, _ = precision_recall_fscore_support(labels, predictions, labels=ids, average="weighted",
                                                    zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=ids)
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(mf), "weighted_f1": float(wf),
            "macro_precision": float(mp), "macro_recall": float(mr),
            "weighted_precision": float(wp), "weighted_recall": float(wr),
            "per_class": _per_class(names, p, r, f, s), "confusion_matrix": matrix.tolist(), "support": len(labels)}


def multilabel_metrics(probabilities: np.ndarray, labels: np.ndarray, names: list[str],
                       threshold: float = 0.5) -> dict:
    """Multi-label report of ``probabilities >= threshold`` against 0/1 ``labels`` of shape (examples, classes)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.asarray(labels).astype(int).reshape(-1, len(names))
    predictions = (np.asarray(probabilities).reshape(-1, len(names)) >= threshold).astype(int)
    if len(labels) == 0:
        zeros = [0.0] * len(names)
        return {"micro_f1": 0.0, "macro_f1": 0.0, "micro_precision": 0.0, "micro_recall": 0.0,
                "subset_accuracy": 0.0, "hamming_loss": 0.0,
                "per_class": _per_class(names, zeros, zeros, zeros, [0] * len(names)), "support": 0}
    p, r, f, s = precision_recall_fscore_support(labels, predictions, average=None, zero_division=0)
    up, ur, uf, _ = precision_recall_fscore_support(labels, predictions, average="micro", zero_division=0)
    _, _, mf, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    return {"micro_f1": float(uf), "macro_f1": float(mf), "micro_precision": float(up), "micro_recall": float(ur),
            "subset_accuracy": float(np.mean(np.all(predictions == labels, axis=1))),
            "hamming_loss": float(np.mean(predictions != labels)),
            "per_class": _per_class(names, p, r, f, s), "support": len(labels)}


def _correlation(function, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(function(x, y)[0])
    return 0.0 if np.isnan(value) else value


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE, Pearson and Spearman correlation (0.0 when either side is constant; all 0.0 when empty)."""
    from scipy.stats import pearsonr, spearmanr

    x = np.asarray(predictions, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} predictions for {len(y)} labels")
    if len(y) == 0:
        return {"mse": 0.0, "rmse": 0.0, "mae": 0.0, "pearson": 0.0, "spearman": 0.0}
    mse = float(np.mean((x - y) ** 2))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(x - y))),
            "pearson": _correlation(pearsonr, x, y), "spearman": _correlation(spearmanr, x, y)}


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[:2] in ("B-", "I-"):
        return tag[0], tag[2:]
    raise ValueError(f"invalid IOB2 tag {tag!r}: expected 'O', 'B-<type>' or 'I-<type>'")


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities of an IOB2 tag sequence as (type, start, end exclusive), conlleval-style (I-X may start one)."""
    spans: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None  # (type, start) of the open entity
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        if current is not None and (prefix != "I" or kind != current[0]):
            spans.append((current[0], current[1], i))
            current = None
        if prefix != "O" and current is None:
            current = (kind, i)
    if current is not None:
        spans.append((current[0], current[1], len(tags)))
    return spans


def _prf(correct: int, predicted: int, true: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_metrics(true: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level micro precision/recall/F1 (exact type and boundaries) and per-type numbers, like seqeval."""
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true sentences but {len(pred)} predicted")
    correct: Counter[str] = Counter()
    n_true: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    for index, (true_tags, pred_tags) in enumerate(zip(true, pred, strict=True)):
        if len(true_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: {len(true_tags)} true tags but {len(pred_tags)} predicted")
        true_spans, pred_spans = set(entity_spans(true_tags)), set(entity_spans(pred_tags))
        n_true.update(span[0] for span in true_spans)
        n_pred.update(span[0] for span in pred_spans)
        correct.update(span[0] for span in true_spans & pred_spans)
    per_type = {}
    for kind in sorted(n_true.keys() | n_pred.keys()):
        p, r, f = _prf(correct[kind], n_pred[kind], n_true[kind])
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": n_true[kind]}
    p, r, f = _prf(sum(correct.values()), sum(n_pred.values()), sum(n_true.values()))
    return {"precision": p, "recall": r, "f1": f, "per_type": per_type, "support": sum(n_true.values())}


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def squad_exact(pred: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def squad_f1(pred: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers (both empty: 1.0, one empty: 0.0, as the SQuAD v2 script)."""
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict:
    """Mean over the questions in ``answers`` of the best EM/F1 against any gold answer (missing prediction: 0)."""
    exact = f1 = 0.0
    for qid, golds in answers.items():
        if qid not in predictions:
            continue
        golds = [gold for gold in golds if normalize_answer(gold)] or [""]  # unanswerable: only "" is right
        exact += max(squad_exact(predictions[qid], gold) for gold in golds)
        f1 += max(squad_f1(predictions[qid], gold) for gold in golds)
    total = len(answers)
    return {"exact_match": exact / total if total else 0.0, "f1": f1 / total if total else 0.0, "total": total}


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else f"{value:.4f}"


def _table(rows: dict[str, dict]) -> list[str]:
    names = list(rows)
    shown = names[:_TABLE_ROWS]
    width = max([len("weighted avg")] + [len(name[:30]) for name in shown])
    lines = [f"{'':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    for name in shown:
        row = rows[name]
        lines.append(f"{name[:30]:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}"
                     f"  {row['support']:>9}")
    if len(names) > len(shown):
        lines.append(f"... {len(names) - len(shown)} more")
    if names:
        values = np.array([[rows[n]["precision"], rows[n]["recall"], rows[n]["f1"]] for n in names], dtype=float)
        support = np.array([rows[n]["support"] for n in names], dtype=float)
        averages = [("macro avg", values.mean(axis=0))]
        if support.sum() > 0:
            averages.append(("weighted avg", (values * support[:, None]).sum(axis=0) / support.sum()))
        for label, (p, r, f) in averages:
            lines.append(f"{label:<{width}}  {p:>9.4f}  {r:>9.4f}  {f:>9.4f}  {int(support.sum()):>9}")
    return lines


def _matrix(matrix: list[list[int]], names: list[str]) -> list[str]:
    if len(names) > _MATRIX_CLASSES or len(matrix) != len(names):
        return [f"confusion matrix omitted ({len(matrix)} classes)"]
    short = [name[:_MATRIX_NAME] for name in names]
    width = max([len(name) for name in short] + [len(str(v)) for row in matrix for v in row] + [1])
    lines = ["confusion matrix (rows = true, columns = predicted)",
             " ".join([f"{'':<{width}}"] + [f"{name:>{width}}" for name in short])]
    for name, row in zip(short, matrix, strict=True):
        lines.append(" ".join([f"{name:<{width}}"] + [f"{v:>{width}}" for v in row]))
    return lines


def format_report(report: dict, title: str = "") -> str:
    """Aligned plain-text rendering of any report above: per-class table, scalar metrics, confusion matrix."""
    sections: list[list[str]] = [[title]] if title else []
    rows = report.get("per_class", report.get("per_type"))
    if isinstance(rows, dict):
        sections.append(_table(rows))
    scalars = {key: value for key, value in report.items() if isinstance(value, int | float)}
    if scalars:
        width = max(len(key) for key in scalars)
        sections.append([f"{key:<{width}}  {_number(value)}" for key, value in scalars.items()])
    if "confusion_matrix" in report:
        names = list(rows) if isinstance(rows, dict) else [str(i) for i in range(len(report["confusion_matrix"]))]
        sections.append(_matrix(report["confusion_matrix"], names))
    return "\n\n".join("\n".join(lines) for lines in sections)
