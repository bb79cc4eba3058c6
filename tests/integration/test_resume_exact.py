"""Resume is exact with dropout on: a run stopped with schedule.stop_at_step and resumed (checkpoint.resume=auto)
has the same per-step losses (abs 1e-6) and the same final weights (max abs difference <= 1e-6 over every tensor) as
the run straight through, with the shipped debug configs' settings (dropout as the model has it, 0.1; pretraining's
grad_accum_steps=2) and an evaluation before the stop, so the save after an evaluation is covered.

A covering set of cases rather than all 24: every engine (DDP, ZeRO-2, ZeRO-3 in fp32), 1 and 2 ranks, 0 and 2
DataLoader workers, pretraining and fine-tuning each appear. (The cause this guards against: a DataLoader that draws
its base seed from the global torch RNG when its iterator is created, which a resumed run does once more than the
straight one, after the RNG was restored.)"""

import pytest

from dtrain.export import checkpoint_weights
from tests.integration.test_training import losses, run, write_sentiment

STEPS, STOP = 8, 4
TOL = 1e-6
ENGINES = {"ddp": ("parallel.engine=ddp",),
           "zero2": ("parallel.engine=deepspeed", "parallel.zero_stage=2", "precision.dtype=fp32"),
           "zero3": ("parallel.engine=deepspeed", "parallel.zero_stage=3", "precision.dtype=fp32")}
CASES = [  # (task, engine, ranks, data.num_workers, more overrides)
    ("pretrain", "ddp", 1, 0, ("data.bucket_window=0",)),  # the plain order (the configs bucket: 4096)
    ("pretrain", "ddp", 2, 2, ("data.bucket_window=64",)),  # NSP pairs sorted in windows smaller than the epoch
    ("pretrain", "zero2", 2, 0, ()),
    ("pretrain", "zero3", 2, 0, ()),  # with 2 workers it hung once: a forked eval worker deadlocked inside os.fork
    ("finetune", "ddp", 1, 2, ()),
    ("finetune", "zero2", 2, 0, ()),
    ("finetune", "ddp", 1, 0, ("peft.method=adapter", "peft.adapter_variant=pfeiffer")),  # frozen base, dropout on
    ("finetune", "zero2", 2, 2, ("task.type=prompt", "task.template={text} it was [MASK].",  # workers: the prompt
                                 "task.verbalizer={pos: [new], neg: [first]}",              # pickled with the task;
                                 "task.prompt_lm_weight=0.2")),                             # MLM masks as resumed
    # a frozen teacher on every rank (not in the checkpoint: loaded again) with a replay mix, under ZeRO-3
    ("finetune", "zero3", 2, 0, ("model.init_from={teacher}", "continual.replay_fraction=0.5",
                                 "continual.distill_weight=1.0")),
    ("finetune", "ddp", 1, 2, ("distill.teacher={teacher}", "distill.student_layers=[1]", "distill.alpha=0.3")),
    # windows of long documents (weighted 1/windows), a stop inside the epoch, the task pickled to the workers
    ("finetune", "ddp", 2, 2, ("data.train={windowed[train]}", "data.eval={windowed[dev]}", "data.max_seq_len=16")),
]
FIXTURES = ("teacher", "windowed")  # placeholders of the cases' overrides: {name} is that fixture's value


def _tag(override: str) -> str:
    key, _, value = override.partition("=")
    return {"model.init_from": "lwf-replay", "distill.teacher": "distill", "data.train": "windows"}.get(key, value)


@pytest.fixture(scope="module")
def sentiment(tokenizer_dir, tmp_path_factory):
    return write_sentiment(tmp_path_factory.mktemp("sentiment"), tokenizer_dir)


@pytest.fixture(scope="module")
def windowed(tokenizer_dir, tmp_path_factory):
    """Long documents (the keyword at the end) in windows of 16 tokens sharing 4: 2-4 windows each."""
    return write_sentiment(tmp_path_factory.mktemp("windowed"), tokenizer_dir, sizes=(48, 16, 16), length=(10, 30),
                           at_end=True, max_seq_len=16, windows=True, doc_stride=4)


@pytest.fixture(scope="module")
def teacher(sentiment, tokenizer_dir, tmp_path_factory):
    """A finished fine-tuning run: the teacher (and the init_from) of the continual cases."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={sentiment['train']}",
                 "data.eval=null", "data.test=null", "data.max_seq_len=32", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={run_dir}", "schedule.max_steps=4", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _args(task, corpus_data, sentiment, tokenizer_dir, run_dir, engine, workers, *extra):
    common = [f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}", f"schedule.max_steps={STEPS}",
              f"eval.every_steps={STOP}", f"data.num_workers={workers}", "logging.every_steps=1",
              "logging.progress_bar=false", "checkpoint.export=false", *ENGINES[engine], *extra]
    if task == "pretrain":
        return ["--config", "configs/pretrain/debug.yaml", f"data.train={corpus_data / 'train'}",
                f"data.eval={corpus_data / 'eval'}", *common]
    return ["--config", "configs/finetune/debug.yaml", f"data.train={sentiment['train']}",
            f"data.eval={sentiment['dev']}", "data.test=null", "data.max_seq_len=32", *common]


@pytest.mark.parametrize(("task", "engine", "ranks", "workers", "more"), CASES,
                         ids=[f"{t}-{e}-{r}rank-{w}workers" + (f"-{_tag(m[0])}" if m else "")
                              for t, e, r, w, m in CASES])
def test_a_stopped_and_resumed_run_equals_the_straight_one_with_dropout(task, engine, ranks, workers, more,
                                                                        corpus_data, sentiment, tokenizer_dir,
                                                                        tmp_path, request):
    module = f"dtrain.{task}"
    for name in FIXTURES:
        if any("{" + name in m for m in more):
            value = request.getfixturevalue(name)
            more = tuple(m.format(**{name: value}) if "{" + name in m else m for m in more)

    def train(run_dir, *extra):
        result = run(module, *_args(task, corpus_data, sentiment, tokenizer_dir, run_dir, engine, workers, *more,
                                    *extra),
                     nproc=ranks, timeout=300)  # a hang fails in minutes
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    straight = losses(train(tmp_path / "straight"))
    first = train(tmp_path / "resumed", f"schedule.stop_at_step={STOP}")
    second = train(tmp_path / "resumed")
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints'}/step-{STOP:08d} at step {STOP}" in \
        second.stdout + second.stderr
    stopped, resumed = losses(first), losses(second)
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert sorted(stopped) == list(range(1, STOP + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    final = f"checkpoints/step-{STEPS:08d}"
    a, b = checkpoint_weights(tmp_path / "straight" / final), checkpoint_weights(tmp_path / "resumed" / final)
    assert a.keys() == b.keys()
    worst = max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)
    off = {step: (loss, straight[step]) for step, loss in (stopped | resumed).items()
           if loss != pytest.approx(straight[step], abs=TOL)}
    assert not off and worst <= TOL, f"losses (resumed, straight) that differ: {off}; max weight difference {worst:.3g}"


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_a_stream_leaves_the_global_rng_alone(pretrain_data, workers):
    import torch

    from dtrain.data.stream import StreamingDataset, StreamLoader

    loader = StreamLoader(StreamingDataset(pretrain_data, batch_size=4, seed=5, rank=0, world_size=1),
                          lambda samples: [s["index"] for s in samples], num_workers=workers)
    before = torch.get_rng_state()
    for _ in range(2):
        next(iter(loader))  # a new DataLoader iterator (and its workers) each time
    assert torch.equal(torch.get_rng_state(), before)
