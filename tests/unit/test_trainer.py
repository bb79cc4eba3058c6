"""The Trainer's decisions, in-process with a fake engine (no process group, no model): early stopping's gain and
min_delta, the best model reloaded after fit, schedule.stop_at_step, runs of fp16 skips, the agreed stop on a signal,
and the one dict of stateful parts that a checkpoint saves and a resume restores."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

import dtrain.trainer as trainer_module
from dtrain.checkpoint import Checkpointer
from dtrain.config import CheckpointConfig, EarlyStoppingConfig, EvalConfig, PrecisionConfig, ScheduleConfig
from dtrain.distributed import DistEnv
from dtrain.engine.base import NonFiniteError, StepInfo
from dtrain.trainer import Objective, Plan, Trainer, TrainerSections

ENV = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")


class FakeEngine:
    """Counts its applied steps as its "weights"; step() replays scripted StepInfos (default: a plain step)."""

    device = torch.device("cpu")
    lr = 0.1

    def __init__(self, infos=()):
        self.model = torch.nn.Linear(1, 1)
        self.infos = list(infos)
        self.weights = 0  # applied (not skipped) steps: what a checkpoint of this engine holds
        self.loaded: list[str] = []

    def train(self, mode=True):
        pass

    @contextlib.contextmanager
    def evaluating(self):
        yield

    def micro_batch(self, last):
        return contextlib.nullcontext()

    def forward(self, fn, batch):
        return fn(self.model, batch)

    def backward(self, loss):
        pass

    def step(self):
        info = self.infos.pop(0) if self.infos else StepInfo(False, 1.0, None)
        self.weights += not info.skipped
        return info

    def save(self, path: Path):
        (path / "engine.json").write_text(json.dumps({"weights": self.weights}))

    def load(self, path: Path):
        self.weights = json.loads((path / "engine.json").read_text())["weights"]
        self.loaded.append(path.name)


class FakeLoader:
    """An endless-enough stream of 4-sample batches whose position is its state."""

    def __init__(self):
        self.position = 0

    def __len__(self):
        return 1000

    def __iter__(self):
        while self.position < 1000:
            self.position += 1
            yield {"x": torch.full((4, 1), float(self.position)), "pad": torch.zeros(4, dtype=torch.bool),
                   "attention_mask": torch.ones(4, 3), "index": torch.arange(4)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class FakeLogger:
    def __init__(self):
        self.lines: list[str] = []

    def step(self, step, scalars, samples, tokens):
        pass

    def eval(self, step, metrics, prefix="eval"):
        pass

    def info(self, text):
        self.lines.append(text)


OBJECTIVE = Objective(lambda model, batch: {"mse": (model(batch["x"]) ** 2).sum()},
                      lambda batch: {"mse": torch.tensor(batch["x"].shape[0])})


def make(tmp_path, steps=10, scores=None, metric="accuracy", keep_best=True, infos=(), **sections):
    """A Trainer over the fakes; scores: the metric of each evaluation in turn (evaluation every step)."""
    values = iter(scores or [])
    evaluate = (lambda engine: {metric: next(values)}) if scores is not None else None
    sections.setdefault("checkpoint", CheckpointConfig(export=False))
    plan = Plan(steps, evaluate, eval_every=1 if evaluate else None, metric=metric, keep_best=keep_best)
    return Trainer(ENV, FakeEngine(infos), FakeLoader(), OBJECTIVE, Checkpointer(tmp_path, ENV, keep_last=2),
                   FakeLogger(), TrainerSections(**sections), plan)


def test_early_stopping_counts_evaluations_whose_gain_is_not_above_min_delta(tmp_path):
    # baseline 0.50; 0.60 gains 0.10 (> 0.05: best, patience reset); 0.64 and 0.649 gain < 0.05 over 0.60: stop
    trainer = make(tmp_path, scores=[0.50, 0.60, 0.64, 0.649, 0.9],
                   early_stopping=EarlyStoppingConfig(patience=2, min_delta=0.05))
    state = trainer.fit()
    assert state.step == 3 and [h["step"] for h in state.history] == [0, 1, 2, 3]
    assert (state.baseline, state.best, state.best_step, state.bad_evals) == (0.50, 0.60, 1, 2)
    assert any(line.startswith("early stopping: accuracy") for line in trainer.logger.lines)


def test_a_loss_metric_improves_downwards_and_min_delta_zero_takes_any_gain(tmp_path):
    trainer = make(tmp_path, steps=4, scores=[2.0, 1.5, 1.6, 1.4, 1.39], metric="loss",
                   early_stopping=EarlyStoppingConfig(patience=3))
    state = trainer.fit()
    assert state.step == 4 and not trainer.maximize
    assert (state.best, state.best_step, state.bad_evals) == (1.39, 4, 0)


def test_the_best_checkpoint_is_reloaded_after_fit(tmp_path):
    trainer = make(tmp_path, steps=4, scores=[0.1, 0.5, 0.9, 0.7, 0.6])
    trainer.fit()
    assert (trainer.state.best, trainer.state.best_step, trainer.model_step) == (0.9, 2, 2)
    assert trainer.engine.loaded == ["step-00000002"] and trainer.engine.weights == 2  # the step-2 weights
    assert trainer.checkpointer.best().name == "step-00000002"
    assert trainer.checkpointer.latest().name == "step-00000004"  # the last state stays the one to resume


def test_without_keep_best_the_last_model_stays(tmp_path):
    trainer = make(tmp_path, steps=4, scores=[0.1, 0.5, 0.9, 0.7, 0.6], keep_best=False)
    trainer.fit()
    assert trainer.engine.loaded == [] and trainer.model_step == 4 and trainer.checkpointer.best() is None


def test_when_the_best_is_the_last_step_nothing_is_reloaded(tmp_path):
    trainer = make(tmp_path, steps=3, scores=[0.1, 0.2, 0.3, 0.4])
    trainer.fit()
    assert trainer.engine.loaded == [] and trainer.model_step == 3 == trainer.state.best_step


def test_stop_at_step_saves_and_stops_and_the_next_run_resumes_there(tmp_path):
    trainer = make(tmp_path, steps=10, keep_best=False, schedule=ScheduleConfig(stop_at_step=3))
    state = trainer.fit()
    assert (trainer.interrupted, state.step, trainer.checkpointer.latest().name) == ("stopped", 3, "step-00000003")
    saved = json.loads((tmp_path / "checkpoints/step-00000003/trainer.json").read_text())
    assert saved["step"] == 3 and saved["world_size"] == 1 and saved["stream"] == {"position": 3}
    assert saved["samples"] == 12  # the trainer counters at the top level, as earlier versions wrote them
    again = make(tmp_path, steps=10, keep_best=False)
    assert again.resume("auto").name == "step-00000003"
    assert (again.state.step, again.state.samples, again.loader.position, again.engine.weights) == (3, 12, 3, 3)
    assert again.fit().step == 10 and again.interrupted is None and again.engine.weights == 10


def test_the_parts_dict_restores_every_stateful_part(tmp_path):
    trainer = make(tmp_path, steps=10, keep_best=False, schedule=ScheduleConfig(stop_at_step=2))
    trainer.fit()
    assert set(trainer.parts) == {"trainer", "stream", "rng", "engine"}
    expected = torch.rand(3)  # the RNG as it was saved at step 2 (nothing drew from it since)
    again = make(tmp_path, steps=10, keep_best=False)
    torch.manual_seed(1234)
    again.resume("auto")
    assert torch.equal(torch.rand(3), expected)
    assert again.state.step == 2 and again.loader.position == 2 and again.engine.weights == 2


def test_an_earlier_version_s_trainer_json_resumes(tmp_path):
    trainer = make(tmp_path, steps=10, keep_best=False, schedule=ScheduleConfig(stop_at_step=2))
    trainer.fit()
    path = tmp_path / "checkpoints/step-00000002/trainer.json"
    old = json.loads(path.read_text())
    del old["skipped_in_a_row"], old["train_seconds"]  # keys added later
    path.write_text(json.dumps(old))
    (tmp_path / "checkpoints/step-00000002/manifest.json").unlink()  # written before manifests existed
    again = make(tmp_path, steps=10, keep_best=False)
    again.resume("auto")
    assert (again.state.step, again.state.skipped_in_a_row, again.state.train_seconds) == (2, 0, 0.0)


def _skip(scale=1024.0):
    return StepInfo(True, float("inf"), scale)


def _ok(scale=1024.0):
    return StepInfo(False, 1.0, scale)


def test_a_run_of_fp16_skips_stops_at_max_consecutive_skips(tmp_path):
    trainer = make(tmp_path, keep_best=False, infos=[_ok(), _skip(), _skip(), _skip()],
                   precision=PrecisionConfig(max_consecutive_skips=3))
    with pytest.raises(NonFiniteError, match=r"step 4: the fp16 loss scale collapsed \(3 steps in a row were skipped"):
        trainer.fit()
    assert trainer.state.step == 3 and trainer.state.skipped == 2


def test_skips_broken_by_an_applied_step_do_not_add_up(tmp_path):
    trainer = make(tmp_path, steps=6, keep_best=False, infos=[_skip(), _skip(), _ok(), _skip(), _skip(), _ok()],
                   precision=PrecisionConfig(max_consecutive_skips=3))
    state = trainer.fit()
    assert (state.step, state.skipped, state.skipped_in_a_row, trainer.engine.weights) == (6, 4, 0, 2)


def test_an_overflow_at_the_loss_scale_floor_stops_at_once(tmp_path):
    trainer = make(tmp_path, keep_best=False, infos=[_ok(4.0), _skip(2.0)],
                   precision=PrecisionConfig(min_loss_scale=2.0))
    with pytest.raises(NonFiniteError, match="overflowed at the floor precision.min_loss_scale=2") as e:
        trainer.fit()
    assert trainer.state.step == 1 and str(e.value).endswith("no checkpoint was saved yet")


def test_a_stop_signal_saves_and_returns_preempted(tmp_path, monkeypatch):
    trainer = make(tmp_path, steps=10, scores=[0.1, 0.2, 0.3, 0.4], eval=EvalConfig(metric="accuracy"))
    signalled = iter([None, "SIGTERM"])
    monkeypatch.setattr(trainer_module, "stop_requested", lambda: next(signalled))
    state = trainer.fit()
    assert (trainer.interrupted, state.step, trainer.checkpointer.latest().name) == ("preempted", 2, "step-00000002")
    assert trainer.engine.loaded == [] and trainer.model_step == 0  # no best reload, no test: a later run resumes
    assert any(line.startswith("a stop signal: saving at step 2") for line in trainer.logger.lines)


def test_a_step_divides_by_a_weighted_target_count_below_one(tmp_path):
    """Windows of long documents weigh 1/windows: 4 windows of 10-window documents count 0.4 targets, and the step's
    loss is the sum over 0.4 (a mean), not over a floor of 1."""
    trainer = make(tmp_path)
    trainer.objective = Objective(lambda model, batch: {"mse": torch.tensor(2.0)},
                                  lambda batch: {"mse": torch.tensor(0.4)})
    seen = []
    trainer.engine.backward = seen.append
    batch = next(iter(FakeLoader()))
    trainer.train_step([batch])
    assert float(seen[0]) == pytest.approx(2.0 / 0.4)
