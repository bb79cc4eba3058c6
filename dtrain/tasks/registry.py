"""The registry: every task by its name (as labels.json and task.type name it), the aliases users type, and the
lookups that turn a name, a prepared dataset or an exported model into a task."""

from __future__ import annotations

from typing import Any

from dtrain.errors import DtrainError
from dtrain.tasks.base import Task
from dtrain.tasks.classification import Classification, Pair
from dtrain.tasks.multilabel import MultiLabel
from dtrain.tasks.ner import Ner
from dtrain.tasks.prompt import PromptTask
from dtrain.tasks.qa import Qa
from dtrain.tasks.regression import Regression

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Pair(), MultiLabel(), Regression(), Ner(), Qa(),
                                            PromptTask())}
ALIASES = {"token_classification": "ner", "question_answering": "qa"}
SEQUENCE_TASKS = tuple(name for name, t in TASKS.items() if t.sequence_level)


def get_task(name: str | Task) -> Task:
    """The task of a name (or an alias); a Task passes through."""
    if isinstance(name, Task):
        return name
    task = TASKS.get(ALIASES.get(name, name))
    if task is None:
        raise DtrainError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return task


def resolve_task(configured: str | None, prepared: str, source: str) -> str:
    """The task of a run: the training set's labels.json task, checked against task.type when that is set; a
    configured task that trains another model on that data (prompt on classification data) is the run's task."""
    if configured is None:
        return prepared
    want = TASKS.get(ALIASES.get(configured, configured))
    if want is None or not want.trains_on(prepared):
        raise DtrainError(f"task.type={configured}, but {source} was prepared for task {prepared!r}; set task.type to "
                          f"{prepared} (or null), or prepare the data with --task")
    data_task = TASKS.get(prepared)  # the data's own task where it trains the same model (pair: classification's)
    return prepared if data_task is not None and data_task.hf_class == want.hf_class else want.name


def infer_task(first_row: tuple, has_pair: bool) -> Task:
    """The task of rows prepared without --task: CoNLL tokens → ner, a list of labels → multilabel, a number →
    regression, else (pair) classification."""
    text, _, label = first_row
    if isinstance(text, list):
        return TASKS["ner"]
    if isinstance(label, list):
        return TASKS["multilabel"]
    if isinstance(label, float):
        return TASKS["regression"]
    return TASKS["pair" if has_pair else "classification"]


def task_of_model(config: dict[str, Any]) -> Task | None:
    """The task of an exported HF model (its config.json): by its class, then its problem_type; a sequence
    classifier without a known problem_type is a classification model."""
    arch = (config.get("architectures") or ["?"])[0]
    fitting = [t for t in TASKS.values() if t.hf_class == arch]
    same = [t for t in fitting if t.problem_type and t.problem_type == config.get("problem_type")]
    return (same or fitting or [None])[0]
