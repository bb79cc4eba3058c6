"""The typed configuration tree: defaults → YAML files (with `base:` inheritance) → dotted overrides.

Every layer is checked against the dataclass schema as it is read, so an error names the key *and* where it came
from (the YAML file or the command-line override). The result is a frozen picture of the run: `to_dict()` /
`save_run_config()` write it back as YAML, and loading that file again gives the same Config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dtrain import schema
from dtrain.files import write_atomic
from dtrain.schema import ConfigError, build, check_layer, merge, opt, type_name

# -- The schema. Sections are filled in by the parts that read them; every field has a help text. ----------------


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = opt("bert-base-uncased", "Pretrained: a Hub id (HF cache or Hub) or a local HF checkpoint "
                                                 "dir; random init: preset:NAME (preset:bert-base-uncased) or tiny")
    tokenizer: str | None = opt(None, "Tokenizer dir or example name; null: the checkpoint's (uncased presets: minilm)")
    init_from: str | None = opt(None, "Fine-tuning: start from an earlier fine-tuned run dir or its export "
                                      "(encoder and head weights)")
    dropout: float | None = opt(None, "Override hidden and attention dropout; null keeps the checkpoint's", ge=0, lt=1)
    attn_implementation: Literal["sdpa", "eager"] = opt("sdpa", "Attention kernel: sdpa (fused) or eager")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory")
    unpad: bool = opt(True, "Dense layers on the real tokens only, attention re-padded (sdpa; same weights and math)")
    compile: bool = opt(False, "torch.compile the encoder (inductor; dynamic shapes, so it compiles at the first step)")


@dataclass(frozen=True)
class DataConfig:
    train: str | None = opt(None, "Prepared training dataset dir (output of `dtrain prepare`)")
    eval: str | None = opt(None, "Prepared evaluation dataset dir")
    test: str | None = opt(None, "Prepared test dataset dir (reported once at the end)")
    max_seq_len: int = opt(128, "Maximum tokens per sequence, [CLS] and [SEP] included", ge=8, le=8192)
    micro_batch_size: int = opt(32, "Sequences per device per forward pass", ge=1)
    num_workers: int = opt(2, "DataLoader worker processes per rank", ge=0)
    shuffle: bool = opt(True, "Shuffle shards and samples each epoch (deterministic from seed and epoch)")
    drop_last: bool = opt(True, "Drop the last incomplete global batch of an epoch instead of padding it")
    shuffle_block: int = opt(65536, "Samples shuffled together after the shard order is permuted", ge=1)
    bucket_window: int = opt(0, "Batch similar lengths (sorted in windows of N samples; 0 = off)", ge=0)
    verify: Literal["size", "full"] = opt("size", "Shard check when a dataset is opened: size, or full sha256")
    mlm_probability: float = opt(0.15, "Fraction of tokens selected for MLM prediction", gt=0, lt=1)
    whole_word_masking: bool = opt(False, "Mask all WordPiece pieces of a word together")
    max_predictions_per_seq: int = opt(20, "Cap on masked positions per sequence", ge=1)
    nsp_probability: float = opt(0.5, "Fraction of NSP pairs whose second segment is the true next one", ge=0, le=1)
    eval_extra: dict[str, str] | None = opt(None, "Fine-tuning: more prepared sets by name, e.g. {movies: "
                                                  "data/sentiment_en/test}, evaluated with data.eval and on the final "
                                                  "model (report.json extra; never used to pick the model)")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "lamb"] = opt("adamw", "Optimizer")
    lr: float = opt(1e-4, "Peak learning rate", gt=0)
    weight_decay: float = opt(0.01, "Decoupled weight decay (not applied to biases and LayerNorm)", ge=0)
    betas: list[float] = opt([0.9, 0.999], "Adam/LAMB beta1, beta2")
    eps: float = opt(1e-6, "Adam/LAMB epsilon", gt=0)
    max_grad_norm: float | None = opt(1.0, "Clip the global gradient norm to this; null disables", gt=0)
    layerwise_lr_decay: float = opt(1.0, "Per-layer LR multiplier from the top layer down (1.0 = off)", gt=0, le=1)


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int | None = opt(None, "Optimizer steps to train; null = run `epochs` epochs", ge=1)
    epochs: float = opt(1.0, "Epochs to train when max_steps is null", gt=0)
    grad_accum_steps: int = opt(1, "Micro-batches accumulated per optimizer step", ge=1)
    stop_at_step: int | None = opt(None, "Save and stop after this step; the LR schedule still spans the whole run "
                                   "(split a run over time-limited jobs)", ge=1)
    warmup: float = opt(0.06, "Warmup: a fraction of all steps if < 1, else a number of steps", ge=0)
    decay: Literal["linear", "cosine", "constant", "poly"] = opt("linear", "LR decay after warmup")


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "Compute precision (fp16 uses dynamic loss scaling)")
    initial_loss_scale_power: int = opt(16, "fp16: initial loss scale is 2**this", ge=0, le=32)
    loss_scale_window: int = opt(1000, "fp16: steps without overflow before the scale doubles", ge=1)
    min_loss_scale: float = opt(1.0, "fp16: the scale never goes below this", gt=0)
    max_consecutive_skips: int = opt(50, "fp16: stop the run (naming the last good checkpoint) after this many "
                                         "overflow-skipped steps in a row, or at an overflow at min_loss_scale", ge=1)


@dataclass(frozen=True)
class ParallelConfig:
    engine: Literal["ddp", "deepspeed"] = opt("ddp", "Training engine: torch DDP or DeepSpeed")
    zero_stage: Literal[0, 1, 2, 3] = opt(0, "DeepSpeed ZeRO stage")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "Process-group backend; auto = nccl on GPU, gloo on CPU")
    deepspeed_config: str | None = opt(None, "JSON file merged over the DeepSpeed config dtrain generates")
    offload_optimizer: bool = opt(False, "DeepSpeed ZeRO 1-3: keep optimizer states (and step) in CPU memory")
    offload_params: bool = opt(False, "DeepSpeed ZeRO 3: keep parameters in CPU memory between uses")
    timeout_s: int = opt(1800, "Seconds a collective may wait for the other ranks before the run fails (a rank "
                               "that hangs or died); raise it for very slow steps or checkpoints", ge=1)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = opt(None, "Save a checkpoint every N optimizer steps; null = at the end only", ge=1)
    keep_last: int = opt(3, "How many recent checkpoints to keep", ge=1)
    resume: str = opt("auto", "auto (latest in run_dir), none, or a checkpoint dir")
    export: bool = opt(True, "Export the final model in Hugging Face format to <run_dir>/export")


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = opt(10, "Log loss, LR, throughput and MFU every N optimizer steps", ge=1)
    tensorboard: bool = opt(True, "Write TensorBoard event files to <run_dir>/tb")
    progress_bar: bool = opt(True, "Show a progress bar on rank 0")
    ledger: bool = opt(False, "Debug: each rank appends each step's sample ids to <run_dir>/ledger/rank-R.jsonl")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int | None = opt(None, "Evaluate on data.eval every N optimizer steps; null = once per epoch", ge=1)
    metric: str | None = opt(None, "Metric that picks the best checkpoint and drives early stopping; null = the "
                                   "task's (accuracy, micro_f1, pearson, entity f1, QA f1; pretraining: loss)")
    mode: Literal["auto", "max", "min"] = opt("auto", "Whether a larger metric is better; auto: min for *loss/mse/"
                                                      "rmse/mae, else max")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int | None = opt(None, "Stop after N evaluations without improvement; null = never stop early", ge=1)
    min_delta: float = opt(0.0, "An evaluation improves only if it beats the best by more than this", ge=0)


def _task_names() -> list[str]:
    from dtrain.tasks.registry import ALIASES, TASKS  # lazily: the registry imports torch; the list is written there

    return [*TASKS, *ALIASES]


@dataclass(frozen=True)
class TaskConfig:
    type: str | None = opt(None, "Fine-tuning task (a name of the task registry, dtrain/tasks); null = as the training "
                                 "set's labels.json says", choices=_task_names)
    class_weights: list[float] | None = opt(None, "classification: loss weight per class, in labels.json order")
    label_smoothing: float = opt(0.0, "classification: label smoothing of the cross-entropy", ge=0, lt=1)
    threshold: float = opt(0.5, "multilabel: probability at or above which a label is predicted", gt=0, lt=1)
    max_answer_length: int = opt(30, "question_answering: longest answer span in tokens", ge=1)
    n_best: int = opt(20, "question_answering: start and end candidates per window when decoding spans", ge=1)
    extend_labels: bool = opt(False, "With model.init_from: allow new labels (old ones keep their head rows)")
    template: str | None = opt(None, "prompt: the cloze template, {text} (and {text_pair}) and one [MASK], e.g. "
                                     "\"{text} It was [MASK].\"")
    verbalizer: dict[str, list[str]] | None = opt(None, "prompt: each label's words (one word piece each), e.g. "
                                                        "{positive: [great], negative: [terrible]}")
    prompt_lm_weight: float = opt(0.0, "prompt: weight of an auxiliary MLM loss on the training texts (PET); 0 = off",
                                  ge=0)
    window_pooling: str | None = opt(None, "Windowed data (prepare --windows): pool a document's windows' "
                                     "probabilities (mean, max) or logits (mean_logits, max_logits); null = mean",
                                     choices=lambda: POOLINGS)


@dataclass(frozen=True)
class PeftConfig:
    method: Literal["none", "lora", "bitfit", "prompt_tuning", "adapter"] = opt(
        "none", "Parameter-efficient fine-tuning: none (full), lora, bitfit, prompt_tuning, adapter (bottleneck)")
    freeze_embeddings: bool = opt(False, "Freeze the embedding layer")
    freeze_layers: int = opt(0, "Freeze the lowest N encoder layers", ge=0)
    train_head_only: bool = opt(False, "Freeze the whole encoder; only the task head trains")
    lora_r: int = opt(8, "LoRA rank", ge=1)
    lora_alpha: float = opt(16.0, "LoRA scaling alpha", gt=0)
    lora_dropout: float = opt(0.1, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = opt(["query", "value"], "Module names LoRA adapts")
    num_virtual_tokens: int = opt(20, "Prompt tuning: virtual tokens prepended", ge=1)
    adapter_variant: Literal["houlsby", "pfeiffer"] = opt(
        "houlsby", "Adapters: houlsby (after attention and feed-forward) or pfeiffer (after feed-forward only)")
    adapter_reduction_factor: int = opt(16, "Adapters: bottleneck width = hidden size / this", ge=1)
    adapter_non_linearity: Literal["relu", "gelu", "swish", "tanh"] = opt("relu", "Adapters: the bottleneck's "
                                                                                  "activation")
    adapter_train_layer_norm: bool = opt(True, "Adapters: the LayerNorms train too (as Houlsby et al.)")


@dataclass(frozen=True)
class ContinualConfig:
    replay_fraction: float = opt(0.0, "Replayed old samples per new training sample in every epoch (a fixed seeded "
                                      "sample of what model.init_from trained on, or of replay_data); 0 = off", ge=0,
                                 le=10)
    replay_data: str | None = opt(None, "The prepared set to replay (default: what model.init_from's run trained on)")
    distill_weight: float = opt(0.0, "Learning without forgetting: weight of T²·KL(the frozen model.init_from model ‖ "
                                     "this one) on the new batches; 0 = off", ge=0)
    temperature: float = opt(2.0, "Softmax temperature of continual.distill_weight's soft targets", gt=0)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = opt(None, "Knowledge distillation: a fine-tuned run dir or export (same task, labels, "
                                    "tokenizer) whose soft predictions the model learns")
    alpha: float = opt(0.5, "Weight of the label loss; the teacher's T²·KL term gets 1 - alpha", ge=0, le=1)
    temperature: float = opt(2.0, "Softmax temperature of the teacher's soft targets", gt=0)
    student_layers: list[int] | None = opt(None, "Student = the teacher with only these encoder layers (0-based, "
                                                 "e.g. [0, 2, 4]); null: model.name_or_path or model.init_from")


@dataclass(frozen=True)
class Config:
    name: str = opt("dtrain", "Run name (used in logs)")
    seed: int = opt(42, "Seed for model init, data order and masking", ge=0, le=2 ** 32 - 1)
    debug: bool = opt(False, "Debug run: tiny model (for presets), at most 20 steps, eval + checkpoint midway")
    run_dir: str = opt("runs/dtrain", "Directory for config.yaml, logs, checkpoints and the export")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)


def iter_keys(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    """Every leaf key of the schema as (dotted path, type, field)."""
    return schema.iter_keys(cls, prefix)


INHERIT_KEYS = ("base", "defaults")  # a YAML file may name the file(s) it extends under either key
POOLINGS = ("mean", "max", "mean_logits", "max_logits")  # task.window_pooling: of probabilities, or of logits


# -- Loading ---------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One YAML file with its bases merged under it, checked against the schema."""
    path = path.resolve()
    if path in chain:
        cycle = " → ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: inheritance cycle ({cycle}); remove one of the base: entries")
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        if chain:  # named by a base: entry, not by --config
            raise ConfigError(f"{chain[-1]}: base file {path} {what}; fix the base: entry (a path relative to "
                              f"{chain[-1].parent})")
        raise ConfigError(f"config file {path} {what}; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the syntax") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(raw).__name__}")
    merged: dict[str, Any] = {}
    for key in INHERIT_KEYS:
        bases = raw.pop(key, None)
        if bases is None:
            continue
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str):
                raise ConfigError(f"{path}: {key}: expected a file name or a list of file names, got {base!r}")
            merged = merge(merged, _read_yaml(path.parent / base, (*chain, path)))
    return merge(merged, check_layer(raw, Config, "", f"in {path}"))


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """`optim.lr=3e-5 data.max_seq_len=128` → a checked nested dict."""
    merged: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-5")
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        merged = merge(merged, check_layer(nested, Config, "", f"command-line override {item}"))
    return merged


DEBUG_STEPS = 20  # debug mode: at most this many steps, with an evaluation and a checkpoint midway


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *,
                derive: typing.Callable[[Config], typing.Sequence[str]] | None = None,
                examples: bool = False) -> Config:
    """Defaults ← YAML file (and its bases) ← dotted overrides, validated, then resolved once: debug mode (a
    random-init preset becomes tiny, at most DEBUG_STEPS steps, eval + checkpoint midway, no worker processes);
    derive(cfg) → more key=value overrides the caller works out from the config (finetune: task.type from the
    training set's labels.json); examples=True (a run's config): an example name in model.name_or_path becomes its
    fetched dir. The Config returned is frozen."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path), ())
    values = merge(values, parse_overrides(overrides))
    cfg = _resolved(values)
    if derive is not None and (extra := derive(cfg)):
        cfg = _resolved(merge(values, parse_overrides(extra)))
    if examples:
        from dtrain.data.examples import example_or_path  # lazily: only a run fetches (a leaf module, no cycle)

        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=example_or_path(cfg.model.name_or_path)))
    return cfg


def _resolved(values: dict[str, Any]) -> Config:
    cfg = build(Config, values)
    validate(cfg)
    if not cfg.debug:
        return cfg
    from dtrain.model.source import preset_of  # a leaf module (presets only)

    steps = min(cfg.schedule.max_steps or DEBUG_STEPS, DEBUG_STEPS)
    half = max(1, steps // 2)
    replace = dataclasses.replace
    model = replace(cfg.model, name_or_path="tiny") if preset_of(cfg.model.name_or_path) else cfg.model  # a
    # random-init preset becomes the tiny one; checkpoints stay
    return replace(cfg, model=model, schedule=replace(cfg.schedule, max_steps=steps),
                   eval=replace(cfg.eval, every_steps=half), checkpoint=replace(cfg.checkpoint, every_steps=half),
                   data=replace(cfg.data, num_workers=0))


def validate(cfg: Config) -> None:
    """Checks that span several keys (each key's own type and range are checked as it is read)."""
    p, c, d, init = cfg.parallel, cfg.continual, cfg.distill, cfg.model.init_from
    extra = [f"{name}/" for name in cfg.data.eval_extra or {}]
    for wrong, message in [
        ((p.offload_optimizer or p.offload_params) and p.engine != "deepspeed", "parallel.offload_optimizer/"
         "offload_params need parallel.engine=deepspeed; set it or turn offloading off"),
        (p.offload_optimizer and p.zero_stage == 0, "parallel.offload_optimizer needs parallel.zero_stage >= 1"),
        (p.offload_params and p.zero_stage != 3, "parallel.offload_params needs parallel.zero_stage=3"),
        (c.distill_weight and d.teacher, "continual.distill_weight and distill.teacher both set a teacher; use one"),
        (c.distill_weight and not init, "continual.distill_weight distils from the model.init_from model; set "
                                        "model.init_from (or use distill.teacher)"),
        (c.replay_fraction and not (init or c.replay_data), "continual.replay_fraction replays the data of the "
         "model.init_from run; set model.init_from or continual.replay_data"),
        ((c.replay_fraction or c.distill_weight) and cfg.task.extend_labels, "continual.replay_fraction/"
         "distill_weight with task.extend_labels: the earlier model and data know fewer labels (not supported yet); "
         "turn one off"),
        (d.student_layers is not None and not d.teacher, "distill.student_layers builds the student from "
                                                         "distill.teacher's layers; set distill.teacher"),
        (d.student_layers is not None and init, "distill.student_layers and model.init_from both say where the "
                                                "student starts; use one"),
        (cfg.eval.metric and cfg.eval.metric.startswith(tuple(extra)), f"eval.metric={cfg.eval.metric}: the "
         f"data.eval_extra sets are watched, never used to pick the model; name a metric of data.eval"),
        (p.engine == "ddp" and p.zero_stage != 0, f"parallel.zero_stage={p.zero_stage} needs parallel.engine="
         f"deepspeed (DDP has no ZeRO); set parallel.engine=deepspeed or parallel.zero_stage=0"),
        (cfg.model.compile and p.engine == "deepspeed" and p.zero_stage == 3, "model.compile=true with DeepSpeed "
         "ZeRO-3: its parameter hooks do not compile; use parallel.zero_stage 0-2 or DDP, or model.compile=false")]:
        if wrong:
            raise ConfigError(message)


def save_run_config(cfg: Config, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as <run_dir>/config.yaml (atomically). A different config already there is kept
    as config.N.yaml, so a re-run with changed settings never silently erases what the earlier run used."""
    out_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "config.yaml"
    text = cfg.to_yaml()
    if target.exists():
        if target.read_text(encoding="utf-8") == text:
            return target
        n = 1
        while (out_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(target, out_dir / f"config.{n}.yaml")
    write_atomic(target, text)
    return target


def describe_keys(markdown: bool = False) -> str:
    """A table of every key: path, type, default, meaning (`dtrain config keys [--markdown]`; README's table)."""
    defaults = Config().to_dict()
    rows = []
    for path, tp, f in iter_keys():
        value: Any = defaults
        for part in path.split("."):
            value = value[part]
        kind = type_name(tp) if "choices" not in f.metadata else \
            "one of " + ", ".join(map(repr, f.metadata["choices"]())) + (" or null" if value is None else "")
        rows.append((path, kind, json.dumps(value), f.metadata.get("help", "")))
    if markdown:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        return "\n".join(lines + [f"| `{p}` | {t} | `{d}` | {h} |" for p, t, d, h in rows])
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{p:{width}}  {t:28}  {d:20}  {h}" for p, t, d, h in rows)
