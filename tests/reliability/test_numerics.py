"""Numerics faults, injected by a learning rate that blows the weights up: an fp16 loss scale that collapses stops
the run naming the step and the last good checkpoint (instead of skipping steps forever on garbage), under both
triggers (an overflow at the floor, and N overflow skips in a row); the bf16/fp32 NaN stop is in
tests/integration/test_training.py."""

import re

import pytest

from tests.integration.test_training import pretrain_args, run


@pytest.mark.parametrize("trigger, settings", [
    ("it overflowed at the floor precision.min_loss_scale=1", ["precision.initial_loss_scale_power=8"]),
    ("4 steps in a row were skipped for overflow (precision.max_consecutive_skips)",
     ["precision.min_loss_scale=1e-30", "precision.max_consecutive_skips=4"]),
])
def test_fp16_loss_scale_collapse_stops_naming_the_step_and_the_last_good_checkpoint(
        trigger, settings, corpus_data, tokenizer_dir, tmp_path):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, "schedule.max_steps=60",
                                                   "data.eval=null", "precision.dtype=fp16", "optim.lr=1e30",
                                                   "schedule.warmup=0", "optim.max_grad_norm=null",
                                                   "checkpoint.every_steps=1", "checkpoint.keep_last=2", *settings))
    errors = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    m = re.match(r"dtrain: error: step (\d+): the fp16 loss scale collapsed \((.+?)\): ", errors[0])
    assert m and m.group(2) == trigger, errors[0]
    step = int(m.group(1))
    saved = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert saved and int(saved[-1].name.split("-")[1]) == step - 1  # every skipped step still checkpointed
    assert errors[0].endswith(f"last good checkpoint: {saved[-1]}"), errors[0]
    assert "precision.dtype=bf16" in errors[0]
