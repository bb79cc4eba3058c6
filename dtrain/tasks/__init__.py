"""Fine-tuning tasks, one module each behind one registry (registry.py: TASKS, ALIASES, get_task).

A Task (base.py) owns everything that differs between tasks: how `prepare` reads and labels its rows and which
shard columns it writes, its collated targets, its HF class and head config, its loss terms and target counts, its
evaluation records and report, how predictions are decoded, and what PEFT needs to know (head module, peft task
type, sequence- or token-level). Outside this package no code branches on a task's name: it asks the task.

Imports run one way: a task module may import data/ and model/ (it is where the two meet), and data/ and model/
never import dtrain.tasks. So `dtrain.data.prepare.write_finetune` and `dtrain.model.peft.apply_peft` receive the task
object from their caller instead of importing the registry: the task is an argument like any other, the dependency
is visible in the signature, and data/ and model/ stay usable (and testable) without the task modules. The thin
functions here that take a task by name (Head, FinetuneCollator, task_model, apply_peft, prepare_finetune) are
where a name becomes a task.

Adding a task: a new module here with a Task subclass, and its line in registry.TASKS.
"""

from dtrain.tasks.base import Task
from dtrain.tasks.labels import LABELS_FILE, LabelMap
from dtrain.tasks.parts import FinetuneCollator, Head, apply_peft, init_from_run, keep_settings, run_task, task_model
from dtrain.tasks.prepare import prepare_finetune
from dtrain.tasks.registry import ALIASES, SEQUENCE_TASKS, TASKS, get_task, infer_task, resolve_task, task_of_model

__all__ = ["ALIASES", "LABELS_FILE", "SEQUENCE_TASKS", "TASKS", "FinetuneCollator", "Head", "LabelMap", "Task",
           "apply_peft", "get_task", "infer_task", "init_from_run", "keep_settings", "prepare_finetune", "resolve_task",
           "run_task", "task_model",
           "task_of_model"]
