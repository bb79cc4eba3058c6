"""DeepSpeed ZeRO 0–3 behind the Engine interface. Its JSON is generated from the dtrain config; a user JSON
(`parallel.deepspeed_config`) is merged on top and every key it changes is reported.

World-size changes. ZeRO 1–3 checkpoints hold one optimizer partition per rank
(`<checkpoint>/deepspeed/*zero_pp_rank_R_*optim_states.pt`), and DeepSpeed's ordinary `load_checkpoint` refuses them at
another world size (DeepSpeed #5405). So when a checkpoint was written by a different number of ranks than this run has
(counted from those files), `load` converts it with DeepSpeed's own universal-checkpoint machinery instead: rank 0 runs
`deepspeed.checkpoint.ds_to_universal` in-process (once; into `<checkpoint>/.tmp-universal`, renamed to
`<checkpoint>/universal` when complete, so a kill mid-conversion leaves nothing that is reused, and a later resume at
any world size reuses the finished one), every rank waits, then every rank loads `<checkpoint>/universal` with
DeepSpeed's `checkpoint.load_universal` switched on for that one call. The conversion is outside manifest.json, so the
checkpoint stays intact to `damage()`, and it is pruned with its checkpoint. DeepSpeed's machinery is used rather than a
re-partitioner of our own because the partition layout (flattening order, alignment padding, ZeRO-3's per-parameter
padding, bf16/fp32 master copies) is DeepSpeed's private format and changes between releases; its converter and loader
are maintained and tested against it. The conversion is lossless (its fp32 weights equal zero_to_fp32's bit for bit);
the run that goes on from it matches one at the new size from the same state only to fp32 rounding, as ZeRO matches DDP:
DeepSpeed reduces the gradients and sums the clipping norm per partition, in an order that depends on the number of
partitions (tests/integration/test_elastic_zero.py measures it). Two gaps in ZeRO-3's universal load are closed here
(`_repair_zero3_universal_load`): it shares one Adam `step` tensor between all sub-groups, and it gives every parameter
group the hyperparameters of group 0 (weight decay, layer-wise LR). A checkpoint written at the same world size loads
exactly as before (bit-exact), and ZeRO-0 (plain data parallel) checkpoints hold the whole optimizer in one file and
load at any world size as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dtrain.distributed import DistEnv, barrier, broadcast_object
from dtrain.engine.base import CheckpointError, Engine, EngineSections, Forward, NonFiniteError, StepInfo, to_device
from dtrain.errors import DtrainError

TAG = "deepspeed"
UNIVERSAL = "universal"  # <checkpoint>/universal/<TAG>: the checkpoint in DeepSpeed's universal format, made on demand
_ZERO_RANK = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def deepspeed_config(cfg: EngineSections, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON of these sections (a whole Config has them too)."""
    p = cfg.precision
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if hidden_size and cfg.parallel.zero_stage > 0:
        # Buffers sized to the model, as HF Trainer's "auto" values do. DeepSpeed's defaults (5e8-element reduce
        # and all-gather buckets) are sized for billion-parameter models: for BERT they cost more memory per rank
        # than ZeRO-3 saves (bench/memory.py measured ZeRO-3 at 1.3x DDP with them, below 1x without).
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["allgather_bucket_size"] = max(hidden_size * hidden_size, 50_000_000)
        if cfg.parallel.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.schedule.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.schedule.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload works with dtrain's torch optimizer too
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {"enabled": p.dtype == "fp16", "loss_scale": 0, "initial_scale_power": p.initial_loss_scale_power,
                 "loss_scale_window": p.loss_scale_window, "min_loss_scale": p.min_loss_scale},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict[str, Any], path: str | None) -> tuple[dict[str, Any], list[str]]:
    """The generated config with the user's JSON on top; returns (merged, one line per key the user changed)."""
    if not path:
        return generated, []
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DtrainError(f"parallel.deepspeed_config={path}: cannot read it as JSON ({e}); fix the file") from None
    changes: list[str] = []

    def merge(base: dict, top: dict, prefix: str) -> dict:
        out = dict(base)
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, f"{prefix}{key}.")
            else:
                if key in out and out[key] != value:
                    changes.append(f"{prefix}{key}: dtrain {out[key]!r} → {Path(path).name} {value!r}")
                out[key] = value
        return out

    return merge(generated, user, ""), changes


@contextlib.contextmanager
def partitioned_build(sections: EngineSections, world_size: int) -> Iterator[None]:
    """Under ZeRO-3 (dtrain's stage or a user JSON's), a transformers model built inside is born partitioned: no rank
    ever holds the whole model. transformers' own integration does it (HfDeepSpeedConfig alive: from_pretrained and
    `_from_config` build under `deepspeed.zero.Init`, rank 0 reads the checkpoint and each rank keeps its partition of
    every tensor; fresh weights are initialised on the gathered tensor). Modules built outside transformers (LoRA,
    adapters, a grown head) stay whole until deepspeed.initialize partitions them. Other stages: nothing changes."""
    config, _ = merge_user_config(deepspeed_config(sections, world_size), sections.parallel.deepspeed_config)
    if config["zero_optimization"].get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config.pop("train_batch_size")  # (derived: zero.Init reads the config before DeepSpeed knows the world size)
    alive = HfDeepSpeedConfig(config)  # transformers holds a weak reference only
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


class DeepSpeedEngine(Engine):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv,
                 sections: EngineSections):
        import deepspeed

        self.env, self.device, self.model = env, env.device, model
        self.stage = sections.parallel.zero_stage
        config, self.changes = merge_user_config(
            deepspeed_config(sections, env.world_size, getattr(getattr(model, "config", None), "hidden_size", None)),
            sections.parallel.deepspeed_config)
        if env.is_main:
            for change in self.changes:
                print(f"dtrain: parallel.deepspeed_config overrides {change}", file=sys.stderr)
        self.gas = int(config["gradient_accumulation_steps"])
        if self.gas != sections.schedule.grad_accum_steps:
            raise DtrainError("parallel.deepspeed_config sets gradient_accumulation_steps; set "
                              "schedule.grad_accum_steps instead (the loop must agree with DeepSpeed)")
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Forward(model), optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False)
        self.fp16 = bool(config["fp16"]["enabled"])
        self.half = self.fp16 or bool(config["bf16"]["enabled"])

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed counts micro-steps itself

    def forward(self, fn: Callable[[torch.nn.Module, dict], dict], batch: dict) -> dict:
        batch = to_device(batch, self.device)
        return self.ds(batch, fn)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps: undo both
        self.ds.backward(loss * self.env.world_size * self.gas)
        self.ds.step()  # a micro-step; the optimizer runs at the accumulation boundary

    def step(self) -> StepInfo:
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.ds.optimizer, "overflow", False)) if self.fp16 else False
        if not self.fp16 and not math.isfinite(norm) and norm == norm:  # inf (nan means "not reported")
            raise NonFiniteError(f"the gradient norm is {norm}: training diverged; lower optim.lr or resume from an "
                                 f"earlier checkpoint")
        scale = float(getattr(self.ds.optimizer, "cur_scale", 0.0)) if self.fp16 else None
        return StepInfo(skipped, norm, scale)

    @property
    def lr(self) -> float:
        return float(max(self.ds.get_lr()))

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=TAG)

    def load(self, path: Path) -> None:
        written = written_world_size(path / TAG) if self.stage > 0 else None
        if written is not None and written != self.env.world_size:
            self._load_universal(path, written)
            return
        loaded, _ = self.ds.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
        if loaded is None:
            raise DtrainError(f"{path}: no DeepSpeed checkpoint (tag {TAG}) in it; it was written by another engine")

    def _load_universal(self, path: Path, written: int) -> None:
        """Resume a ZeRO checkpoint written at another world size: rank 0 converts it to DeepSpeed's universal
        format (or reuses the conversion), then every rank loads its own partition of that."""
        universal = path / UNIVERSAL
        error = None
        if self.env.is_main:
            how = "resuming from its conversion to DeepSpeed's universal checkpoint" if universal.is_dir() else \
                "converting it with DeepSpeed's universal checkpoint (ds_to_universal) and resuming from that"
            print(f"dtrain: checkpoint {path} was written at world size {written}, this run has "
                  f"{self.env.world_size}: {how} ({universal})", file=sys.stderr, flush=True)
            try:
                convert_to_universal(path / TAG, universal)
            except Exception as e:  # noqa: BLE001 - any failure of the converter is reported in one line
                error = (f"checkpoint {path} was written at world size {written} and could not be converted for "
                         f"this run's {self.env.world_size} ranks with DeepSpeed's ds_to_universal ({_first_line(e)}); "
                         f"resume it at world size {written}, or fix the cause and resume again")
        error = broadcast_object(error)  # every rank waits here for rank 0's conversion
        if error:
            raise CheckpointError(error)
        barrier()
        config = self.ds._config  # DeepSpeed reads `checkpoint.load_universal` from here at load time
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            loaded, _ = self.ds.load_checkpoint(str(universal), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        except (AssertionError, OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} (written at world size {written}): DeepSpeed could not load its "
                                  f"universal conversion {universal} at world size {self.env.world_size} "
                                  f"({_first_line(e)}); remove {universal} to convert it again, or resume at world "
                                  f"size {written}") from None
        finally:
            config.load_universal_checkpoint = before
        if loaded is None:
            raise CheckpointError(f"{universal}: no DeepSpeed checkpoint (tag {TAG}) in it; remove it to convert "
                                  f"{path} again")
        if self.stage == 3:
            self._repair_zero3_universal_load(universal / TAG / "zero" / "optimizer_state.pt")

    def _repair_zero3_universal_load(self, optimizer_state: Path) -> None:
        """Two gaps in ZeRO-3's universal load (deepspeed/runtime/zero/stage3.py,
        load_hp_checkpoint_state_from_checkpoint_dir_stage3), closed here. (1) It stores one and the same `step`
        tensor in the state of every sub-group; torch's Adam(W) increments it in place, once per
        sub-group, so it would advance by the number of sub-groups per step (a wrong bias correction from the second
        step after the resume on; measured: 3e-4 off DDP's loss one step later): each state gets its own copy.
        (2) It copies the hyperparameters of param_groups[0] into every group, which would put weight decay on
        biases and LayerNorm and give every layer group the same LR: each group's own are put back from the
        converted optimizer state (the base optimizer's state dict of rank 0, every group in order)."""
        for state in self.ds.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        saved = torch.load(optimizer_state, map_location="cpu", weights_only=False)
        groups = saved.get("optimizer_state_dict", {}).get("param_groups")
        current = self.ds.optimizer.param_groups
        if not groups or len(groups) != len(current):
            raise CheckpointError(f"{optimizer_state}: {len(groups or [])} optimizer parameter groups, this run has "
                                  f"{len(current)}; resume with the config the checkpoint was written with")
        for group, saved_group in zip(current, groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def full_state_dict(self, checkpoint: Path | None = None) -> dict[str, torch.Tensor] | None:
        """All ranks take part (ZeRO-3 gathers the partitions); rank 0 gets the weights. In bf16/fp16 with ZeRO
        1–3 and a checkpoint of the current state given, these are its fp32 master weights (the module itself
        holds 16-bit copies)."""
        import deepspeed

        if self.half and self.stage > 0 and checkpoint is not None:
            return fp32_weights(checkpoint) if self.env.is_main else None

        params = list(self.model.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.stage == 3 \
            else contextlib.nullcontext()
        with gather:
            if self.env.is_main:
                return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
        return None


def fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a DeepSpeed checkpoint dir (one process, no process group): ZeRO 1–3 through
    DeepSpeed's zero_to_fp32 (the fp32 master partitions joined); ZeRO-0 from its module states as they are (it has
    no per-rank partitions, and DeepSpeed 0.19's zero_to_fp32 fails on it with a TypeError)."""
    tag_dir = checkpoint / TAG
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))  # ZeRO 0-2 (ZeRO-3 writes one per rank, partitioned)
    module = (torch.load(files[0], map_location="cpu", weights_only=False)["module"] or {}) if files else {}
    if written_world_size(tag_dir) is None:
        state = module
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG))
        # frozen parameters have no fp32 master, and ZeRO-1 does not save them with the partitions (DeepSpeed saves
        # frozen parameters from stage 2 on): they are the module's own (16-bit under bf16/fp16). ZeRO-3 has no
        # whole-module file (and saves its frozen parameters with the partitions).
        state.update({k: v for k, v in module.items() if k not in state and v.numel() > 0})
    return {k.removeprefix("model."): v.float() for k, v in state.items()}


def written_world_size(tag_dir: Path) -> int | None:
    """How many data-parallel ranks wrote the ZeRO checkpoint in `tag_dir`, from its per-rank optimizer files
    ((bf16_)zero_pp_rank_R_mp_rank_00_optim_states.pt); None when it has none (ZeRO-0, another engine)."""
    ranks = {int(m.group(1)) for f in tag_dir.glob("*zero_pp_rank_*optim_states.pt") if (m := _ZERO_RANK.match(f.name))}
    return max(ranks) + 1 if ranks else None


def convert_to_universal(tag_dir: Path, out: Path) -> bool:
    """Convert the DeepSpeed checkpoint in `tag_dir` into DeepSpeed's universal format at `out`/<TAG> with
    deepspeed.checkpoint.ds_to_universal (in this process, no worker pool); False when `out` is already there.
    Written into a sibling .tmp- dir renamed to `out` when complete, so an interrupted conversion is never reused
    (the next one removes its leftover)."""
    if out.is_dir():
        return False
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    # main()'s own arguments (parse_arguments): one extract and one merge worker run the work inline, without
    # child processes; inject_missing_state adds the universal-checkpoint metadata that a checkpoint saved without
    # client state lacks (ZeRO 1–2 assert on it). main() also writes <tmp>/latest_universal, which moves with it.
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp / TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # (its progress prints and tqdm bars)
        for f in tmp.rglob("*"):  # on disk before the rename makes it visible, as checkpoints are
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
