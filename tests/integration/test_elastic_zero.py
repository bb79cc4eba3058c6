"""Elastic resume of DeepSpeed ZeRO: a checkpoint written at one world size resumes at another through DeepSpeed's
universal checkpoint (ds_to_universal), and the run goes on as one started at the new size from the same weights
and optimizer state would. The reference is the same chain of world sizes under DDP, whose checkpoints hold the
whole state and resume anywhere.

Tolerances, from measurement (fp32, 2 CPU ranks, TensorBoard's float32 losses): the conversion itself is lossless (its
fp32 weights equal zero_to_fp32's bit for bit); what differs from DDP is DeepSpeed's own fp32 arithmetic, which reduces
the gradients and sums the clipping norm per partition, in another order than DDP's buckets: the weights are 0.8-1.2e-7
off DDP's already at step 2, before any conversion, and ZeRO-0, which converts nothing, is 1.9e-6 off at step 3. Over
the chain, every stage and transition (2→1 steps 3-4, 1→2 steps 5-6, 2→3 steps 7-8) stayed within 1.9e-6 of DDP's
loss with dropout on (2.9e-6 with dropout off), the weights after 8 steps within 7.4e-7. The summaries parsed here
print 7 significant digits (steps of 1e-5 at a loss of ~11), hence LOSS_TOL; WEIGHT_TOL is about 13x the weights' gap.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_training import losses, pretrain_args, run

GLOBAL_BATCH = 12  # divisible by every world size of the chain: micro-batch 12 / ranks, no accumulation
LEGS = ((2, 2), (1, 4), (2, 6), (3, 8))  # (ranks, last step): 2→1, 1→2 and 2→3 ranks
COMMON = ("schedule.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=10", "data.eval=null",
          "checkpoint.export=false", "model.dropout=null")  # dropout as the model has it (on)
LOSS_TOL = 3e-5
WEIGHT_TOL = 1e-5
CONVERTING = "converting it with DeepSpeed's universal checkpoint (ds_to_universal) and resuming from that"


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def failure(stderr: str) -> str:
    """What a failed leg said: the lines naming the cause (a C++ abort's `what()` sits far above torchrun's summary,
    which fills the tail), then the tail."""
    cues = ("terminate", "what()", "Error", "error:", "Abort", "Signal", "Traceback")
    causes = [line for line in stderr.splitlines() if any(c in line for c in cues)]
    return "\n".join(causes[:40]) + "\n...\n" + stderr[-3000:]


def chain(corpus_data, tokenizer_dir, run_dir, legs, *extra):
    """Train the legs in turn in one run_dir, each resuming from the last one's checkpoint; their results."""
    results = []
    for ranks, last in legs:
        result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, run_dir, *COMMON, *extra,
                                                       f"data.micro_batch_size={GLOBAL_BATCH // ranks}",
                                                       f"schedule.stop_at_step={last}"), nproc=ranks)
        assert result.returncode == 0, (ranks, last, failure(result.stderr))
        results.append(result)
    return results


@pytest.fixture(scope="module")
def ddp_chain(corpus_data, tokenizer_dir, tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("ddp-chain")
    results = chain(corpus_data, tokenizer_dir, run_dir, LEGS, "parallel.engine=ddp",
                    f"model.name_or_path={tiny_checkpoint}")
    per_step = {}
    for result in results:
        per_step |= losses(result)
    assert sorted(per_step) == list(range(1, 9))
    return per_step, run_dir


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_resumes_at_other_world_sizes_as_ddp_does(corpus_data, tokenizer_dir, tmp_path, ddp_chain, stage,
                                                       tiny_checkpoint):
    from dtrain.checkpoint import damage
    from dtrain.export import checkpoint_weights

    legs = LEGS if stage else LEGS[:2]  # ZeRO-0 keeps the whole state in one file: its path is not the conversion
    results = chain(corpus_data, tokenizer_dir, tmp_path, legs, "parallel.engine=deepspeed",
                    f"parallel.zero_stage={stage}", f"model.name_or_path={tiny_checkpoint}")  # (ZeRO-3 initialises
    # a preset's random weights in its own way: a checkpoint gives every engine the same start)
    reference, ddp_dir = ddp_chain
    ours = {}
    for (ranks, last), result, previous in zip(legs, results, ((None, 0), *legs), strict=False):
        ours |= losses(result)
        state = json.loads((ckpt(tmp_path, last) / "trainer.json").read_text())
        # the data stream is where a run at any world size would be: steps x the global batch, nothing lost
        assert state["world_size"] == ranks and state["stream"]["position"] == last * GLOBAL_BATCH, state
        lines = [line for line in result.stderr.splitlines() if line.startswith("dtrain: checkpoint")]
        source = ckpt(tmp_path, previous[1])
        if stage and previous[0] not in (None, ranks):
            expected = f"dtrain: checkpoint {source} was written at world size {previous[0]}, this run has {ranks}: "
            assert len(lines) == 1 and lines[0].startswith(expected + CONVERTING), result.stderr[-3000:]
            assert (source / "universal" / "deepspeed" / "zero" / "optimizer_state.pt").is_file()
            assert not (source / ".tmp-universal").exists()
            assert damage(source) is None  # the conversion lies outside the manifest
        else:
            assert lines == [] and not (source / "universal").exists(), result.stderr[-3000:]
    steps = legs[-1][1]
    assert sorted(ours) == list(range(1, steps + 1))
    for step in ours:
        assert ours[step] == pytest.approx(reference[step], abs=LOSS_TOL), (stage, step, ours[step] - reference[step])
    mine, theirs = checkpoint_weights(ckpt(tmp_path, steps)), checkpoint_weights(ckpt(ddp_dir, steps))
    gap = max((mine[k] - v.float()).abs().max().item() for k, v in theirs.items() if k in mine)
    assert gap < WEIGHT_TOL, (stage, gap)


def test_a_failed_conversion_stops_in_one_line_and_a_leftover_is_never_reused(corpus_data, tokenizer_dir, tmp_path):
    from dtrain.engine.deepspeed import convert_to_universal

    zero = ("parallel.engine=deepspeed", "parallel.zero_stage=1", "schedule.max_steps=2", "checkpoint.every_steps=1",
            "data.eval=null", "checkpoint.export=false", f"data.micro_batch_size={GLOBAL_BATCH // 2}")
    first = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "run", *zero,
                                                  "schedule.stop_at_step=1"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    source = ckpt(tmp_path / "run", 1)
    (source / ".tmp-universal").write_text("not a directory\n")  # the converter cannot write its output
    failed = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "run", *zero,
                                                   f"data.micro_batch_size={GLOBAL_BATCH}"))
    errors = [line for line in failed.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert failed.returncode == 2 and len(errors) == 1, failed.stderr[-3000:]
    assert errors[0].startswith(f"dtrain: error: checkpoint {source} was written at world size 2 and could not be "
                                f"converted for this run's 1 ranks with DeepSpeed's ds_to_universal ("), errors[0]
    assert errors[0].endswith("resume it at world size 2, or fix the cause and resume again"), errors[0]
    assert not (source / "universal").exists()

    # a conversion killed half-way leaves only .tmp-universal: the next one removes it and starts over; a finished
    # conversion is reused (it does not depend on the world size it is loaded at)
    out = tmp_path / "universal"
    (tmp_path / ".tmp-universal" / "deepspeed" / "zero").mkdir(parents=True)
    torch.save({"half": "done"}, tmp_path / ".tmp-universal" / "deepspeed" / "zero" / "optimizer_state.pt")
    assert convert_to_universal(source / "deepspeed", out) is True
    assert not (tmp_path / ".tmp-universal").exists()
    optimizer = torch.load(out / "deepspeed" / "zero" / "optimizer_state.pt", weights_only=False)
    assert "param_groups" in optimizer and "half" not in optimizer
    assert (out / "latest_universal").read_text().strip() == "deepspeed"
    assert convert_to_universal(source / "deepspeed", out) is False
