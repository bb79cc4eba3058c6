"""Which model a run keeps: the step-0 baseline (an untrained head) is a bar for early stopping, never the model
tested and exported."""

import contextlib

import torch

from dtrain.config import EarlyStoppingConfig
from dtrain.distributed import DistEnv
from dtrain.trainer import Plan, Trainer, TrainerSections


class _Engine:
    device = torch.device("cpu")

    @contextlib.contextmanager
    def evaluating(self):
        yield


class _Loader:
    def state_dict(self):
        return {}


class _Checkpointer:
    def __init__(self):
        self.saved = []

    def save(self, step, parts, best=False):
        self.saved.append((step, best))


class _Logger:
    def eval(self, step, metrics):
        pass

    def info(self, text):
        pass


def _trainer(values, **kw):
    scores = iter(values)
    checkpointer = _Checkpointer()
    trainer = Trainer(DistEnv(0, 1, 0, torch.device("cpu"), "gloo"), _Engine(), _Loader(), None, checkpointer,
                      _Logger(), TrainerSections(early_stopping=EarlyStoppingConfig(**kw)),
                      Plan(100, evaluate=lambda engine: {"accuracy": next(scores)}, metric="accuracy", keep_best=True))
    return trainer, checkpointer


def _evaluate_at(trainer, steps):
    stops = []
    for step in steps:
        trainer.state.step = step
        stops.append(trainer._eval_and_maybe_stop())
    return stops


def test_the_baseline_is_a_bar_for_early_stopping_but_never_the_model_kept():
    trainer, checkpointer = _trainer([0.60, 0.50, 0.55, 0.52], patience=2)
    stops = _evaluate_at(trainer, [0, 10, 20])
    assert stops == [False, False, True]  # neither trained evaluation beat the baseline: patience 2 runs out
    assert (trainer.state.baseline, trainer.state.best, trainer.state.best_step) == (0.60, 0.55, 20)
    assert checkpointer.saved == [(10, True), (20, True)]  # the best trained model so far, each time


def test_beating_the_baseline_resets_patience_and_min_delta_applies_to_both():
    trainer, checkpointer = _trainer([0.50, 0.53, 0.535, 0.538], patience=2, min_delta=0.01)
    stops = _evaluate_at(trainer, [0, 10, 20, 30])
    assert stops == [False, False, False, True]  # 0.53 beats the baseline by 0.03; the next two gain < 0.01
    assert (trainer.state.best, trainer.state.best_step) == (0.53, 10)
    assert checkpointer.saved == [(10, True)]


def test_a_loss_metric_minimises():
    scores = iter([0.7, 0.9, 0.8])
    trainer, _ = _trainer([])
    trainer.evaluate, trainer.metric, trainer.maximize = (lambda engine: {"loss": next(scores)}), "loss", False
    _evaluate_at(trainer, [0, 10, 20])
    assert (trainer.state.baseline, trainer.state.best, trainer.state.best_step) == (0.7, 0.8, 20)
