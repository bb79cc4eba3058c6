"""Parameter-efficient fine-tuning: freezing (embeddings, the lowest N layers, the whole encoder), BitFit, LoRA,
prompt tuning and bottleneck adapters (adapters.py) on the Hugging Face BERT task models, and the way back to a plain
transformers model for export.

The task head (the task's `head_module`: `classifier`, or `qa_outputs` for QA) always trains. Freezing is
`requires_grad=False`, which `dtrain.optim.parameter_groups` skips, so frozen weights get neither updates nor weight
decay. The task comes from the caller (dtrain.tasks.apply_peft), as a PeftTask: model/ never imports dtrain.tasks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dtrain.errors import DtrainError
from dtrain.model import adapters
from dtrain.model.bert import numel

METHODS = ("none", "lora", "bitfit", "prompt_tuning", "adapter")
_IN_LAYER = re.compile(r"^.*?\.layer\.\d+\.")


class PeftTask(Protocol):
    """What PEFT needs of a task (dtrain.tasks.Task has it): its name, the attribute of the HF model that holds
    its head, peft's task type, and whether it has one output per sequence (prompt tuning needs that)."""

    name: str
    head_module: str
    peft_task_type: str | None
    sequence_level: bool


def head_name(task: PeftTask) -> str:
    """The attribute of the task model that holds its head."""
    return task.head_module


def is_peft(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft PeftModel (LoRA or prompt tuning)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "base_model", None)
    if base is None or base is model or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise DtrainError(f"{type(model).__name__} is not a BERT-style task model (no base_model with embeddings and "
                          f"encoder); PEFT needs a transformers BertFor* model")
    return base


def _freeze(module: torch.nn.Module | None) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(False)


def _frozen_prefixes(model: torch.nn.Module, cfg: Any) -> list[str]:
    """Module names (with a trailing dot) of the parts the freezing options freeze."""
    base = _encoder(model)
    prefix = next(name for name, m in model.named_modules() if m is base)
    prefixes = []
    if cfg.freeze_embeddings:
        prefixes.append(f"{prefix}.embeddings.")
    prefixes += [f"{prefix}.encoder.layer.{i}." for i in range(cfg.freeze_layers)]
    return prefixes


def _apply_freezing(model: torch.nn.Module, cfg: Any, task: PeftTask) -> None:
    base = _encoder(model)
    layers = len(base.encoder.layer)
    if not 0 <= cfg.freeze_layers <= layers:
        raise DtrainError(f"peft.freeze_layers={cfg.freeze_layers} but the model has {layers} encoder layers; set "
                          f"peft.freeze_layers between 0 and {layers}")
    if cfg.train_head_only:
        _freeze(base)
    if cfg.freeze_embeddings:
        _freeze(base.embeddings)
    for layer in base.encoder.layer[:cfg.freeze_layers]:
        _freeze(layer)
    model.get_submodule(head_name(task)).requires_grad_(True)


def _apply_bitfit(model: torch.nn.Module, task: PeftTask) -> None:
    """Only biases (of the parts not frozen already) and the head train."""
    head = f"{head_name(task)}."
    for name, p in model.named_parameters():
        if not (name.endswith("bias") or name.startswith(head)):
            p.requires_grad_(False)


def _lora_targets(model: torch.nn.Module, cfg: Any, task: PeftTask) -> list[str]:
    """Full names of the Linear modules LoRA adapts: those a target names (as peft matches it: the whole name or a
    dotted suffix), outside the head and the frozen parts."""
    head = head_name(task)
    linear = [name for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != head and not name.startswith(f"{head}.")]
    targets = list(cfg.lora_target_modules)
    if not targets:
        raise DtrainError("peft.lora_target_modules is empty; name the linear layers LoRA adapts, e.g. [query, value]")
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            raise DtrainError(f"peft.lora_target_modules: {target!r} matches no module of the model; "
                              f"{_linear_layers(model, linear)}")
    frozen = tuple(_frozen_prefixes(model, cfg))
    chosen = [name for name in linear if any(name == t or name.endswith(f".{t}") for t in targets)
              and not name.startswith(frozen)]
    if not chosen:
        raise DtrainError(f"peft.lora_target_modules {targets} are all in frozen parts (peft.freeze_layers="
                          f"{cfg.freeze_layers}, peft.freeze_embeddings={cfg.freeze_embeddings}); lower "
                          f"peft.freeze_layers or use peft.method=none")
    return chosen


def _linear_layers(model: torch.nn.Module, linear: list[str]) -> str:
    """'BERT's linear layers are query, key, value, dense (attention.output.dense, ...)' for an error message."""
    base_prefix = f"{getattr(model, 'base_model_prefix', '')}."
    short = list(dict.fromkeys(_IN_LAYER.sub("", n).removeprefix(base_prefix) for n in linear))
    leaves = list(dict.fromkeys(s.rsplit(".", 1)[-1] for s in short))
    ambiguous = [s for s in short if sum(t.rsplit(".", 1)[-1] == s.rsplit(".", 1)[-1] for t in short) > 1]
    kind = getattr(getattr(model, "config", None), "model_type", "the model").upper()
    return f"{kind}'s linear layers are {', '.join(leaves)}" + (f" ({', '.join(ambiguous)})" if ambiguous else "")


def apply_peft(model: torch.nn.Module, cfg: Any, task: PeftTask, sequence_tasks: Sequence[str] = ()) -> torch.nn.Module:
    """The model to train under the `peft` config section: freezing first, then the method.

    none/bitfit change `requires_grad` in place and return `model`; lora/prompt_tuning return a peft PeftModel that
    wraps `model` (which peft changes in place). Every result is called as the task model is (input_ids,
    attention_mask, token_type_ids → .logits, or .start_logits/.end_logits for qa)."""
    head = head_name(task)
    if cfg.method not in METHODS:
        raise DtrainError(f"peft.method {cfg.method!r} is unknown; choose one of {', '.join(METHODS)}")
    if cfg.train_head_only and cfg.method != "none":
        raise DtrainError(f"peft.train_head_only trains the task head alone, which contradicts "
                          f"peft.method={cfg.method}; set peft.method=none or peft.train_head_only=false")
    if cfg.method == "prompt_tuning" and not task.sequence_level:
        raise DtrainError(f"peft.method=prompt_tuning supports sequence-level tasks ({', '.join(sequence_tasks)}), "
                          f"not {task.name}; use lora")
    _apply_freezing(model, cfg, task)
    if cfg.method == "none":
        return model
    if cfg.method == "bitfit":
        _apply_bitfit(model, task)
        return model
    if cfg.method == "adapter":  # bottleneck adapters: dtrain's own (adapters.py says why)
        if not adapters.has_adapters(model):  # (model.init_from an adapter export brings its adapters)
            adapters.add_adapters(model, adapters.settings(cfg))
        adapters.freeze_for_adapters(model, head)
        return model
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    if cfg.method == "lora":
        peft_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=_lora_targets(model, cfg, task), task_type=task.peft_task_type,
                              modules_to_save=[head])
    else:
        peft_cfg = PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="SEQ_CLS")
    wrapped = get_peft_model(model, peft_cfg)
    saved = wrapped.active_peft_config.modules_to_save  # peft appends its default head names (again)
    wrapped.active_peft_config.modules_to_save = list(dict.fromkeys(saved)) if saved else saved
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad and f".{head}.modules_to_save." in n]
    if not trainable:  # peft's modules_to_save is what trains the head; make sure it did
        raise DtrainError(f"peft did not make the task head {head!r} trainable; check the installed peft version")
    return wrapped


def trainable_summary(model: torch.nn.Module) -> str:
    """'trainable parameters: 296,450 of 4,402,434 (6.73%)', tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(numel(p) for p in params)
    trainable = sum(numel(p) for p in params if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def _copy_to_load(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` to load a whole state dict into. A parameter ZeRO-3 partitioned (its tensor is empty,
    `ds_shape` is its shape; a copy keeps neither) becomes an ordinary one of its whole shape, tied ones stay tied, and
    DeepSpeed's hooks are dropped: no gather, so rank 0 alone can call it."""
    shapes = {(name, key): (p.ds_shape, id(p)) for name, module in model.named_modules(remove_duplicate=False)
              for key, p in module._parameters.items() if p is not None and hasattr(p, "ds_shape")}
    copied = copy.deepcopy(model)
    whole: dict[int, torch.nn.Parameter] = {}
    for name, module in copied.named_modules(remove_duplicate=False):
        for key, p in list(module._parameters.items()):
            if (name, key) in shapes:
                shape, ident = shapes[name, key]
                if ident not in whole:
                    whole[ident] = torch.nn.Parameter(torch.empty(shape), requires_grad=p.requires_grad)
                module._parameters[key] = whole[ident]
        if shapes:  # DeepSpeed's gathering hooks came with the copy: it is no longer theirs
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for handle, hook in list(hooks.items()):
                    if getattr(getattr(hook, "func", hook), "__module__", "").startswith("deepspeed"):
                        del hooks[handle]
    return copied


def base_hf_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A model to export, with `state_dict` (keys as `model.state_dict()`, e.g. consolidated from a checkpoint)
    loaded first into a deep copy; `model` itself is never changed.

    - none/bitfit/freezing: the transformers model itself (or the loaded copy).
    - lora: a copy with the adapters merged into the base weights (merge_and_unload), a plain BertFor* model whose
      outputs equal the unmerged model's in eval mode; its save_pretrained dir loads with AutoModelFor*.
    - prompt_tuning: the virtual tokens cannot be merged into weights, so the PeftModel is returned. Its
      save_pretrained(dir) writes a peft adapter (adapter_config.json + adapter_model.safetensors: the prompt
      embeddings and the head), not a transformers model; load it with
      `PeftModel.from_pretrained(<the same base BertFor* model>, dir)`. The frozen base is not in that dir; save it
      beside it (`model.get_base_model().save_pretrained(...)`) when it is not a checkpoint on disk already.
    The training flag (dropout) is kept as it was; call .eval() for inference."""
    if state_dict is not None:
        model = _copy_to_load(model)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise DtrainError(f"the state dict does not fit the model ({str(e).splitlines()[0][:200]}); pass the "
                              f"weights of the model apply_peft returned (same peft.method)") from None
    if not is_peft(model):
        return model
    if model.active_peft_config.is_prompt_learning:
        return model
    if state_dict is None:
        model = copy.deepcopy(model)
    return model.merge_and_unload()
