"""Bottleneck adapters (`peft.method=adapter`): small down-project → non-linearity → up-project blocks with a
residual connection, inserted into every encoder layer of a frozen BERT (Houlsby et al. 2019; Pfeiffer et al. 2020).

Written here because no maintained library does it for transformers 5: AdapterHub's `adapters` pins transformers
4.57 (adapter-hub/adapters #834), and peft has no bottleneck adapters (huggingface/peft #244, open since 2023).

- houlsby: an adapter after the attention output projection and one after the feed-forward output projection of
  every layer; pfeiffer: only after the feed-forward output. Each sits where the papers put it: on the sub-layer's
  output (after its dropout), before the residual add and LayerNorm.
- bottleneck width = hidden_size // reduction_factor; the up-projection starts at zero, so an adapted model computes
  exactly what the base model does until it trains (near-identity initialisation; the down-projection is normal
  with the model's initializer_range).
- the base model is frozen; the adapters and the task head train, and the LayerNorms too when
  `adapter_train_layer_norm` (Houlsby trains them).

The adapted sub-layers keep HF's parameter names (their class is swapped for a subclass whose forward calls the
adapter: `...attention.output.dense` stays where it was; the adapter adds `...attention.output.adapter.{down,up}`),
so checkpoints, DeepSpeed's partitioning and `model.init_from` see an ordinary module tree. Adapters cannot be merged
into the weights (the non-linearity), so an export keeps them beside the HF model (`save`): the base + head as the
usual config.json + model.safetensors, the adapters as ADAPTER_WEIGHTS with their settings in ADAPTER_CONFIG;
`load` (dtrain.load_model) puts them back, and the result works in `transformers.pipeline(...)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from dtrain.errors import DtrainError

ADAPTER_CONFIG = "dtrain_adapters.json"
ADAPTER_WEIGHTS = "dtrain_adapters.safetensors"
VARIANTS = {"houlsby": ("attention", "output"), "pfeiffer": ("output",)}  # sub-layers that get an adapter
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    """x + up(act(down(x))); `up` starts at zero (the identity)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _adapted_forward(self: nn.Module, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput's forward with the adapter on the projected output."""
    hidden_states = self.dropout(self.dense(hidden_states))
    return self.LayerNorm(self.adapter(hidden_states) + input_tensor)


_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    """A subclass of the HF sub-layer class whose forward calls its adapter (one per class, so it pickles)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Adapted{cls.__name__}", (cls,), {"forward": _adapted_forward,
                                                                "__module__": __name__})
        globals()[_CLASSES[cls].__name__] = _CLASSES[cls]
    return _CLASSES[cls]


def __getattr__(name: str) -> type:
    """Adapted<HF class> on demand, so a pickled adapted model loads in a process that has not made one yet."""
    if name.startswith("Adapted"):
        from transformers.models.bert import modeling_bert

        base = getattr(modeling_bert, name.removeprefix("Adapted"), None)
        if isinstance(base, type):
            return _adapted_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layers(model: nn.Module) -> Any:
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if base is None or layers is None or getattr(model.config, "model_type", None) != "bert":
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise DtrainError(f"peft.method=adapter needs a BERT model (BertFor*), not {kind}; use a BERT checkpoint "
                          f"for model.name_or_path")
    return layers


def settings(cfg: Any) -> dict[str, Any]:
    """The adapter settings of the peft config section, checked."""
    if cfg.adapter_variant not in VARIANTS:
        raise DtrainError(f"peft.adapter_variant={cfg.adapter_variant}: choose one of {', '.join(VARIANTS)}")
    if cfg.adapter_non_linearity not in ACTIVATIONS:
        raise DtrainError(f"peft.adapter_non_linearity={cfg.adapter_non_linearity}: choose one of "
                          f"{', '.join(ACTIVATIONS)}")
    return {"variant": cfg.adapter_variant, "reduction_factor": cfg.adapter_reduction_factor,
            "non_linearity": cfg.adapter_non_linearity, "train_layer_norm": cfg.adapter_train_layer_norm}


def add_adapters(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Insert the adapters into `model` in place (its weights unchanged); returns it. Freezing is the caller's."""
    layers = _layers(model)
    hidden = model.config.hidden_size
    bottleneck = max(1, hidden // int(options["reduction_factor"]))
    for layer in layers:
        for where in VARIANTS[options["variant"]]:
            sub = layer.attention.output if where == "attention" else layer.output
            if hasattr(sub, "adapter"):
                raise DtrainError("the model has adapters already; add them once")
            sub.adapter = Adapter(hidden, bottleneck, options["non_linearity"], model.config.initializer_range)
            sub.adapter.to(device=sub.dense.weight.device, dtype=sub.dense.weight.dtype)
            sub.__class__ = _adapted_class(type(sub))
    model.dtrain_adapters = dict(options)  # what `save` records
    return model


def freeze_for_adapters(model: nn.Module, head: str) -> None:
    """Only the adapters, the task head (`head`: its attribute) and, when configured, the LayerNorms train."""
    train_norm = model.dtrain_adapters["train_layer_norm"]
    for name, p in model.named_parameters():
        keep = ".adapter." in name or name.startswith(f"{head}.") or (train_norm and ".LayerNorm." in name)
        p.requires_grad_(keep)


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "dtrain_adapters")


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the HF model's weights, the adapters' weights) of an adapted model's state dict."""
    base = {k: v for k, v in state.items() if ".adapter." not in k}
    return base, {k: v for k, v in state.items() if ".adapter." in k}


def save(model: nn.Module, state: dict[str, torch.Tensor] | None, out: Path) -> None:
    """The adapters of `model` (weights from `state`, else its own) and their settings into the export dir `out`
    (the HF model beside them is the caller's: save_pretrained with split_state's first part)."""
    from safetensors.torch import save_file

    _, adapters = split_state(state if state is not None else model.state_dict())
    save_file({k: v.detach().float().cpu().contiguous() for k, v in adapters.items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(model.dtrain_adapters, indent=1) + "\n")


def load(model: nn.Module, export_dir: Path) -> nn.Module:
    """Put an export's adapters back into `model` (loaded from the same dir by from_pretrained); a dir without
    adapters returns `model` as it is."""
    if not (export_dir / ADAPTER_CONFIG).is_file():
        return model
    from safetensors.torch import load_file

    try:
        options = json.loads((export_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        settings(SimpleNamespace(**{f"adapter_{k}": options[k] for k in
                                    ("variant", "reduction_factor", "non_linearity", "train_layer_norm")}))
        weights = load_file(str(export_dir / ADAPTER_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError, DtrainError) as e:
        raise DtrainError(f"{export_dir}: its adapters ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}) cannot be read ({e}); "
                          f"export the run again (`dtrain export RUN_DIR OUT`)") from None
    add_adapters(model, options)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    lacking = [k for k in missing if ".adapter." in k]
    if lacking or unexpected:
        raise DtrainError(f"{export_dir}/{ADAPTER_WEIGHTS} does not fit the model ({len(lacking)} adapter weights "
                          f"missing, {len(unexpected)} unexpected); export the run again")
    return model
