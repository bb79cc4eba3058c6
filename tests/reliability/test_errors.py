"""The bad-input catalogue (docs/errors.md) as tests: every bad input dtrain recognises, run as a user would run it
(a fresh process), fails with its one-line message, a non-zero exit status, and no earlier output touched.

CASES is the catalogue: one row per bad input, each with the command, the files it reads, extra environment and the
exact message line. `{name}` in a command or an environment value and `<name>` in a message stand for the same thing:
a path or value that a session fixture of that name below makes (built once, on first use: a prepared dataset, a
finished fine-tuning run ...), or one of `files` (this case's own input files, written first), `new_run` (a run dir
that does not exist yet), `repo`, `python`. Each case checks the exact line (the last of stderr), exit status 2, and
that every earlier output it names (and its own files) is byte-for-byte as before: size, mtime, sha256.
`test_the_catalogue_and_the_tests_agree` keeps docs/errors.md and CASES in step: the same rows, categories, messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import make_corpus, make_tokenizer

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    category: str  # config, run, data, checkpoint, outputs, concurrency, launch, model, labels, prompt,
    # continual
    name: str
    command: tuple[str, ...]
    message: str  # the whole stderr line
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {files} first
    env: dict[str, str] = field(default_factory=dict)
    cpu_only: bool = False  # the input is only bad on a machine without a GPU


PY = "{python}"
DTRAIN = (PY, "-m", "dtrain")
PRETRAIN = (PY, "-m", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml", "data.train={data}",
            "model.tokenizer={tokenizer}", "run_dir={new_run}", "logging.progress_bar=false",
            "logging.tensorboard=false")
FINETUNE = (PY, "-m", "dtrain.finetune", "--config", "configs/finetune/debug.yaml", "data.train={train}",
            "data.eval=null", "data.test=null", "model.tokenizer={tokenizer}", "run_dir={new_run}",
            "data.max_seq_len=32", "logging.progress_bar=false", "logging.tensorboard=false")
PROMPT = (*FINETUNE, "task.type=prompt", "task.template={{text}} It was [MASK].",
          "task.verbalizer={{pos: [new], neg: [first]}}")
PREPARE_FT = (*DTRAIN, "prepare", "finetune", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
              "--workers", "1")
E = "dtrain: error: "
PREDICT = (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.txt", "--output",
           "{files}/preds.jsonl")
TWO_LABELS = "".join(json.dumps({"text": "the growth", "label": v}) + "\n" for v in ("pos", "neg") * 2)

CASES = [
    # -- config: YAML, keys, values, combinations --------------------------------------------------------------------
    Case("config", "unknown-key", (*FINETUNE, "run_dir={run_dir}", "optim.lrr=1e-4"),
         E + "unknown key optim.lrr — did you mean optim.lr? (command-line override optim.lrr=1e-4)"),
    Case("config", "wrong-type",
         (*DTRAIN, "config", "show", "--config", "configs/finetune/debug.yaml", "data.micro_batch_size=lots"),
         E + "data.micro_batch_size: expected int, got lots (command-line override "
             "data.micro_batch_size=lots)"),
    Case("config", "out-of-range",
         (*DTRAIN, "config", "show", "--config", "configs/pretrain/debug.yaml", "schedule.grad_accum_steps=0"),
         E + "schedule.grad_accum_steps: must be >= 1, got 0 (command-line override schedule.grad_accum_steps=0)"),
    Case("config", "unknown-task", (*DTRAIN, "config", "show", "--config", "configs/finetune/debug.yaml",
                                    "task.type=sentiment"),
         E + "task.type: expected one of 'classification', 'pair', 'multilabel', 'regression', 'ner', 'qa', "
             "'prompt', 'token_classification', 'question_answering', got sentiment (command-line override "
             "task.type=sentiment)"),
    Case("config", "missing-config-file", (*FINETUNE, "run_dir={run_dir}", "--config", "{files}/sentiment.yaml"),
         E + "config file <files>/sentiment.yaml not found; pass an existing YAML file to --config"),
    Case("config", "yaml-syntax", (*DTRAIN, "config", "show", "--config", "{files}/run.yaml"),
         E + "<files>/run.yaml: not valid YAML (while parsing a block mapping); fix the syntax",
         files={"run.yaml": "optim:\n  lr: 1e-4\n betas: [0.9, 0.98]\n"}),
    Case("config", "base-cycle", (*DTRAIN, "config", "show", "--config", "{files}/a.yaml"),
         E + "<files>/a.yaml: inheritance cycle (<files>/a.yaml → <files>/b.yaml → <files>/a.yaml); remove one of "
             "the base: entries",
         files={"a.yaml": "base: b.yaml\noptim:\n  lr: 1e-4\n", "b.yaml": "base: a.yaml\n"}),
    Case("config", "zero-stage-with-ddp", (*PRETRAIN, "parallel.engine=ddp", "parallel.zero_stage=2"),
         E + "parallel.zero_stage=2 needs parallel.engine=deepspeed (DDP has no ZeRO); set parallel.engine=deepspeed "
             "or parallel.zero_stage=0"),
    Case("config", "compile-with-zero3",
         (*PRETRAIN, "parallel.engine=deepspeed", "parallel.zero_stage=3", "model.compile=true"),
         E + "model.compile=true with DeepSpeed ZeRO-3: its parameter hooks do not compile; use parallel.zero_stage "
             "0-2 or DDP, or model.compile=false"),
    Case("config", "nccl-without-gpu", (*FINETUNE, "run_dir={run_dir}", "parallel.backend=nccl"),
         E + "parallel.backend=nccl needs CUDA GPUs, and none is visible; use parallel.backend=gloo or auto",
         cpu_only=True),
    Case("config", "deepspeed-fp16-on-cpu", (*PRETRAIN, "parallel.engine=deepspeed", "precision.dtype=fp16"),
         E + "DeepSpeed refuses fp16 on a CPU (it needs AVX512-FP16/AMX); use precision.dtype=bf16, or "
             "parallel.engine=ddp, whose GradScaler does fp16 on CPU",
         cpu_only=True),
    Case("config", "unknown-eval-metric", (*FINETUNE, "data.eval={dev}", "eval.metric=f1"),
         E + "eval.metric=f1: the evaluation reports accuracy, loss, macro_f1, macro_precision, macro_recall, support, "
             "weighted_f1, weighted_precision, weighted_recall; set eval.metric to one of them"),
    Case("config", "seed-out-of-range",
         (*DTRAIN, "config", "show", "--config", "configs/pretrain/debug.yaml", "seed=-1"),
         E + "seed: must be >= 0, got -1 (command-line override seed=-1)"),
    Case("config", "config-is-a-directory", (*FINETUNE, "run_dir={run_dir}", "--config", "{files}"),
         E + "config file <files> is a directory, not a file; pass an existing YAML file to --config"),
    Case("config", "missing-base-file", (*DTRAIN, "config", "show", "--config", "{files}/run.yaml"),
         E + "<files>/run.yaml: base file <files>/sentiment.yaml not found; fix the base: entry (a path relative to "
             "<files>)",
         files={"run.yaml": "base: sentiment.yaml\noptim:\n  lr: 1e-4\n"}),
    # -- run: where a run writes ---------------------------------------------------------------------------------------
    Case("run", "run-dir-is-an-input", (*FINETUNE, "run_dir={train}"),
         E + "run_dir=<train> is also data.train <train>; write the output to another path"),
    Case("run", "run-dir-holds-an-input", (*FINETUNE, "run_dir={files}", "data.eval={files}/dev"),
         E + "run_dir=<files> contains data.eval <files>/dev; write the output to a path that does not hold the "
             "command's inputs",
         files={"dev/notes.txt": "the user's notes\n"}),
    Case("run", "run-dir-is-a-file", (*FINETUNE, "run_dir={files}/notes.txt"),
         E + "run_dir=<files>/notes.txt is a file, not a folder; point run_dir at a new folder or an earlier run's "
             "folder",
         files={"notes.txt": "my notes\n"}),
    Case("run", "run-dir-under-a-file", (*FINETUNE, "run_dir={files}/notes.txt/run"),
         E + "run_dir=<files>/notes.txt/run: <files>/notes.txt is a file, so the run dir cannot be created under it; "
             "point run_dir elsewhere",
         files={"notes.txt": "my notes\n"}),
    Case("run", "run-dir-not-writable", (*FINETUNE, "run_dir=/sys/dtrain-run"),
         E + "run_dir=/sys/dtrain-run: cannot create files in /sys (Permission denied); point run_dir at a folder you "
             "can write"),
    # -- data: `dtrain prepare` inputs ---------------------------------------------------------------------------------
    Case("data", "prepare-output-exists",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{data}", "--tokenizer", "{tokenizer}"),
         E + "<data> already exists and is not empty; choose another output dir or pass --overwrite"),
    Case("data", "prepare-missing-input",
         (*DTRAIN, "prepare", "pretrain", "{files}/wiki.txt", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
          "--workers", "1"),
         E + "input <files>/wiki.txt does not exist; pass existing files or folders"),
    Case("data", "prepare-short-seq-prob-out-of-range",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
          "--short-seq-prob", "1.5"),
         E + "--short-seq-prob 1.5: it is the share of NSP pairs cut short; pass a value from 0 to 1 (BERT's: 0.1)"),
    Case("data", "prepare-non-bio-tag", (*PREPARE_FT, "{files}/ner.conll"),
         E + "<files>/ner.conll line 2: tag 'E-ORG' is not BIO/IOB2 (O, B-TYPE or I-TYPE); convert the tags (e.g. "
             "BIOES E-/S- to I-/B-, bare types to B-/I-)",
         files={"ner.conll": "the\tO\nteam\tE-ORG\n"}),
    Case("data", "prepare-unknown-label", (*PREPARE_FT, "{files}/dev.jsonl", "--labels", "{train}"),
         E + "<files>/dev.jsonl line 3: label 'meh' is not in <train>/labels.json (known: neg, pos); fix the label or "
             "prepare the training set so that it includes it",
         files={"dev.jsonl": "".join(json.dumps({"text": "the growth", "label": label}) + "\n"
                                     for label in ("pos", "neg", "meh"))}),
    Case("data", "prepare-text-not-a-string", (*PREPARE_FT, "{files}/reviews.jsonl"),
         E + "<files>/reviews.jsonl line 2: 'text' must be a string, got 5; quote it or fix the row",
         files={"reviews.jsonl": '{"text": "the growth", "label": "pos"}\n{"text": 5, "label": "neg"}\n'}),
    Case("data", "prepare-missing-text-column", (*PREPARE_FT, "{files}/reviews.csv"),
         E + "<files>/reviews.csv: no column 'text' in the header (columns: review, label); rename the column or pass "
             "--text-field",
         files={"reviews.csv": "review,label\nthe growth,pos\nthe police,neg\n"}),
    # -- data: prepared datasets and label maps given to a run ---------------------------------------------------------
    Case("data", "train-not-set", (*FINETUNE, "run_dir={run_dir}", "data.train=null"),
         E + "data.train is not set; point it at a dataset dir made by `dtrain prepare finetune`"),
    Case("data", "finetune-on-pretraining-data", (*FINETUNE, "data.train={data}"),
         E + "<data> was prepared for 'pretrain' (`dtrain prepare pretrain`), not for fine-tuning: it has no labels; "
             "prepare labelled data with `dtrain prepare finetune`"),
    Case("data", "train-is-a-file", (*FINETUNE, "data.train={train}/labels.json"),
         E + "<train>/labels.json is a file, not a dataset dir; point at the folder that holds manifest.json "
             "(<train>)"),
    Case("data", "train-not-prepared", (*PRETRAIN, "data.train={corpus}"),
         E + "<corpus> has no manifest.json: not a prepared dataset (or preparation did not finish); run `dtrain "
             "prepare`"),
    Case("data", "tokenizer-mismatch", (*PRETRAIN, "model.tokenizer={other_tokenizer}"),
         E + "<data>/manifest.json: prepared with tokenizer <tokenizer> (fingerprint <fingerprint>), but the model's "
             "tokenizer has fingerprint <other_fingerprint>; re-run `dtrain prepare` with the model's tokenizer"),
    Case("data", "shard-truncated", (*PRETRAIN, "data.train={truncated}"),
         E + "shard <truncated>/shard-00000.arrow is truncated or changed (1000 bytes, manifest says <shard_bytes>); "
             "re-run `dtrain prepare` for <truncated>"),
    Case("data", "shard-corrupted", (*PRETRAIN, "data.train={corrupted}", "data.verify=full"),
         E + "shard <corrupted>/shard-00000.arrow fails its checksum (sha256 differs from manifest.json); the file is "
             "corrupted: re-run `dtrain prepare` for <corrupted>"),
    # -- model: what model.name_or_path and --tokenizer name (issue 15, items 5-6) -------------------------------------
    Case("model", "model-hub-id-not-cached", (*FINETUNE, "model.name_or_path=bert-base-uncased"),
         E + "model.name_or_path=bert-base-uncased: no such local dir, not in the Hugging Face cache "
             "(<files>/hf-cache), and the Hub is not reachable (HF_HUB_OFFLINE=1); download it where there is network "
             "(`hf download bert-base-uncased`, then copy the cache or set HF_HUB_CACHE), point model.name_or_path at "
             "a local checkpoint dir, or write preset:bert-base-uncased for a randomly initialised model of that shape",
         env={"HF_HUB_CACHE": "{files}/hf-cache"}),
    Case("model", "model-dir-missing", (*FINETUNE, "model.tokenizer=null", "model.name_or_path={files}/minilm"),
         E + "model.name_or_path=<files>/minilm: no such dir; point it at a local checkpoint dir (or a Hugging Face "
             "Hub id, or preset:NAME for a random-init preset)"),
    Case("model", "model-not-bert", (*FINETUNE, "model.name_or_path={gpt_checkpoint}"),
         E + "<gpt_checkpoint>/config.json: model_type 'gpt2' (GPT2LMHeadModel) is not BERT; dtrain trains BERT "
             "models (model_type bert: BERT, MiniLM and other BERT-architecture checkpoints); point model.name_or_path "
             "at a BERT checkpoint"),
    Case("model", "adapter-model-not-bert", (*FINETUNE, "peft.method=adapter", "model.name_or_path={gpt_checkpoint}"),
         E + "<gpt_checkpoint>/config.json: model_type 'gpt2' (GPT2LMHeadModel) is not BERT; dtrain trains BERT "
             "models (model_type bert: BERT, MiniLM and other BERT-architecture checkpoints); point model.name_or_path "
             "at a BERT checkpoint"),
    Case("prompt", "prompt-template-without-mask", (*PROMPT, "task.template={{text}} It was great."),
         E + "task.template='{text} It was great.' has no [MASK]: the label is read at one mask; write exactly one, "
             'e.g. task.template="{text} It was [MASK]."'),
    Case("prompt", "prompt-template-without-text", (*PROMPT, "task.template=It was [MASK]."),
         E + "task.template='It was [MASK].' has no {text} slot: the text must go into the prompt, e.g. "
             'task.template="{text} It was [MASK]."'),
    Case("prompt", "prompt-label-without-word", (*PROMPT, "task.verbalizer={{pos: [new]}}"),
         E + "task.verbalizer has no word for label 'neg' of data.train (labels: ['neg', 'pos']); add `neg: [word]` "
             "to it"),
    Case("prompt", "prompt-word-of-several-pieces", (*PROMPT, "task.verbalizer={{pos: [new], neg: [growing]}}"),
         E + "task.verbalizer: 'growing' (label 'neg') is 5 word pieces for this tokenizer (g, ##r, ##o, ##w, ##ing); "
             "use a word that is one piece: the mask predicts one piece"),
    Case("prompt", "prompt-model-without-mlm-head",
         (*DTRAIN, "evaluate", "--model", "{run_dir}", "--data", "{dev}", "--prompt", "{files}/prompt.yaml"),
         E + "<run_dir>/export has no trained MLM head (cls.predictions.transform is not in its weights), and a "
             "prompt task scores the verbalizer words with it; continue pretraining it first (python -m "
             "dtrain.pretrain, e.g. configs/pretrain/minilm_bbc_mlm.yaml) and use that run's export",
         files={"prompt.yaml": 'template: "{text} It was [MASK]."\nverbalizer: {pos: [new], neg: [first]}\n'}),
    Case("prompt", "prompt-keys-without-prompt-task", (*FINETUNE, "task.template={{text}} It was [MASK]."),
         E + "task.template is set, but task classification does not use it (a cloze prompt is task.type=prompt); "
             "remove it, or set task.type=prompt"),
    Case("prompt", "prepare-for-prompt", (*PREPARE_FT, "--task", "prompt", "{files}/rows.jsonl"),
         E + "--task prompt: its data is prepared as classification, pair (the task applies when training); pass "
             "--task classification or leave --task out",
         files={"rows.jsonl": '{"text": "a b", "label": "pos"}\n{"text": "c d", "label": "neg"}\n'}),
    Case("model", "tokenizer-without-vocabulary",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{files}/prepared", "--tokenizer", "{files}/tok",
          "--workers", "1"),
         E + "tokenizer <files>/tok: no tokenizer files in the dir (none of tokenizer.json, vocab.txt, vocab.json "
             "...), so every word would be [UNK]; pass the dir of a checkpoint that includes its tokenizer (e.g. the "
             "minilm example from `dtrain fetch-examples`)",
         files={"tok/config.json": json.dumps({"model_type": "bert", "hidden_size": 64})}),
    # -- labels: label sets that cannot train, labels.json that does not fit its dataset (items 7-8) -------------------
    Case("labels", "labels-json-renumbered", (*FINETUNE, "data.train={relabelled}"),
         E + "<relabelled>/labels.json lists 3 labels (neg, unused, pos), but the dataset was prepared with 2 "
             "(manifest.json num_labels); restore the labels.json that `dtrain prepare finetune` wrote, or prepare the "
             "data again"),
    Case("labels", "prepare-mixed-labels", (*PREPARE_FT, "{files}/rows.jsonl"),
         E + "<files>/rows.jsonl line 2: label '1' is a number, but <files>/rows.jsonl line 1 has the name 'pos': "
             "labels that mix numbers (0, 1) and names (neg, pos) become 4 separate classes; give every row a name or "
             "every row a number",
         files={"rows.jsonl": "".join(json.dumps({"text": "the growth", "label": v}) + "\n"
                                      for v in ("pos", 1, "neg", 0))}),
    Case("labels", "prepare-one-class", (*PREPARE_FT, "{files}/rows.jsonl"),
         E + "<files>/rows.jsonl: all 5 examples have the label 'pos', but a classifier needs two classes at least; "
             "add examples of the other class(es) (a dev/test set: prepare it with --labels <train dir>)",
         files={"rows.jsonl": (json.dumps({"text": "the growth", "label": "pos"}) + "\n") * 5}),
    Case("labels", "prepare-one-document",
         (*DTRAIN, "prepare", "pretrain", "{files}/corpus", "--out", "{files}/prepared", "--tokenizer", "{tokenizer}",
          "--workers", "1"),
         E + "<files>/corpus: one document only, but NSP pairs need a segment of another document; add documents (or "
             "--doc-split blank-line if blank lines separate the documents of a file)",
         files={"corpus/a.txt": "The market was up. The team won the game. The bank rate fell.\n"}),
    # -- bounds: sequence lengths and workers (items 9-10) -------------------------------------------------------------
    Case("bounds", "prepare-max-seq-len-too-small", (*PREPARE_FT, "{files}/rows.jsonl", "--max-seq-len", "0"),
         E + "--max-seq-len 0: must be at least 8 (room for [CLS], [SEP] and some text); BERT data is usually prepared "
             "at 128 or 512",
         files={"rows.jsonl": TWO_LABELS}),
    Case("bounds", "prepare-max-seq-len-over-model",
         (*DTRAIN, "prepare", "finetune", "{files}/rows.jsonl", "--out", "{files}/prepared", "--tokenizer",
          "{bounded_tokenizer}", "--workers", "1", "--max-seq-len", "4000"),
         E + "--max-seq-len 4000: longer than the model of tokenizer <bounded_tokenizer> takes (512 tokens, its "
             "model_max_length); use --max-seq-len 512 or less",
         files={"rows.jsonl": TWO_LABELS}),
    Case("bounds", "prepare-workers-zero",
         (*DTRAIN, "prepare", "finetune", "{files}/rows.jsonl", "--out", "{files}/prepared", "--tokenizer",
          "{tokenizer}", "--workers", "0"),
         E + "--workers 0: must be at least 1 (1 tokenizes in this process; leave it out for one process per core, at "
             "most 8)",
         files={"rows.jsonl": TWO_LABELS}),
    Case("bounds", "train-longer-than-model", (*FINETUNE, "data.train={long_train}"),
         E + "data.train=<long_train> holds sequences of up to 602 tokens (prepared with --max-seq-len 1000), but the "
             "model takes at most 512 (max_position_embeddings); prepare it again with --max-seq-len 512 or less"),
    # -- checkpoint, resume, export, predict ---------------------------------------------------------------------------
    Case("checkpoint", "resume-missing-checkpoint",
         (*FINETUNE, "checkpoint.resume={run_dir}/checkpoints/step-00000099"),
         E + "checkpoint.resume=<run_dir>/checkpoints/step-00000099: not a complete, intact dtrain checkpoint (no "
             "trainer.json); pass another step-N dir, auto or none"),
    Case("checkpoint", "resume-other-model-shape",
         (*FINETUNE, "data.train={three_labels}", "checkpoint.resume={run_dir}/checkpoints/step-00000001"),
         E + "checkpoint <run_dir>/checkpoints/step-00000001 does not fit this model/optimizer (Error(s) in loading "
             "state_dict for BertForSequenceClassification:); resume with the config it was written with, or start "
             "fresh (checkpoint.resume=none or another run_dir)"),
    Case("checkpoint", "export-output-not-empty", (*DTRAIN, "export", "{run_dir}", "{files}/hf"),
         E + "OUT <files>/hf exists and is a folder of other files, not an export dir; choose another output dir "
             "(--overwrite replaces only an export dir)",
         files={"hf/README.md": "the model card\n"}),
    Case("checkpoint", "predict-output-exists",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.txt", "--output",
          "{files}/predictions.jsonl"),
         E + "--output <files>/predictions.jsonl exists; pass --overwrite or choose another file",
         files={"reviews.txt": "the growth\nthe police\n", "predictions.jsonl":
                '{"text": "the growth", "label": "pos", "score": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}\n'}),
    Case("checkpoint", "predict-batch-size-zero", (*PREDICT, "--batch-size", "0"),
         E + "--batch-size 0: pass a whole number >= 1", files={"reviews.txt": "the growth\n"}),
    Case("checkpoint", "predict-max-seq-len-over-model", (*PREDICT, "--max-seq-len", "4000"),
         E + "--max-seq-len 4000: the model has 512 positions; pass at most that (or leave it out)",
         files={"reviews.txt": "the growth\n"}),
    Case("checkpoint", "predict-empty-input",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/empty.txt", "--output",
          "{files}/preds.jsonl"),
         E + "--input <files>/empty.txt: holds no rows to predict (the file is empty); pass a file with one text per "
             "line or row",
         files={"empty.txt": ""}),
    Case("checkpoint", "evaluate-threshold-out-of-range",
         (*DTRAIN, "evaluate", "--model", "{run_dir}", "--data", "{dev}", "--threshold", "2"),
         E + "--threshold 2: a probability between 0 and 1 (exclusive), e.g. 0.5"),
    # -- outputs: an output is never an input, inside or above one; --overwrite replaces only the same kind -----------
    Case("checkpoint", "export-training-set-re-prepared", (*DTRAIN, "export", "{reprepared_run}", "{files}/hf"),
         E + "<reprepared_run>/checkpoints/step-00000001: its training set <reprepared_data> no longer matches the "
             "manifest the run trained on (re-prepared since: its manifest.json changed), and the export takes its "
             "labels and its cut of long texts from there; restore that data (the run's own export/ has both)"),
    Case("outputs", "export-into-its-run", (*DTRAIN, "export", "{run_dir}", "{run_dir}", "--overwrite"),
         E + "OUT <run_dir> contains the checkpoint <run_dir>/checkpoints/step-00000001; write the output to a path "
             "that does not hold the command's inputs"),
    Case("outputs", "export-into-checkpoints", (*DTRAIN, "export", "{run_dir}", "{run_dir}/checkpoints", "--overwrite"),
         E + "OUT <run_dir>/checkpoints contains the checkpoint <run_dir>/checkpoints/step-00000001; write the output "
             "to a path that does not hold the command's inputs"),
    Case("outputs", "prepare-overwrite-foreign-dir",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{files}/mine", "--tokenizer", "{tokenizer}",
          "--overwrite"),
         E + "--out <files>/mine exists and is a folder of other files, not a dataset dir; choose another output dir "
             "(--overwrite replaces only a dataset dir)",
         files={"mine/notes.txt": "my notes\n"}),
    Case("outputs", "prepare-overwrite-file",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{files}/notes.txt", "--tokenizer", "{tokenizer}",
          "--overwrite"),
         E + "--out <files>/notes.txt is a file dtrain did not write, not a directory; choose a new directory for the "
             "output",
         files={"notes.txt": "my notes\n"}),
    Case("outputs", "prepare-out-under-a-file",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{files}/notes.txt/data", "--tokenizer", "{tokenizer}"),
         E + "--out <files>/notes.txt/data: <files>/notes.txt is a file, so <files>/notes.txt/data cannot be created "
             "under it; choose another path",
         files={"notes.txt": "my notes\n"}),
    Case("outputs", "prepare-out-not-writable",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "/proc/dtrain-data/data", "--tokenizer", "{tokenizer}"),
         E + "--out /proc/dtrain-data/data: cannot create files in /proc (No such file or directory); choose a path in "
             "a folder you can write"),
    Case("outputs", "prepare-out-inside-input",
         (*DTRAIN, "prepare", "pretrain", "{files}/corpus", "--out", "{files}/corpus/data", "--tokenizer",
          "{tokenizer}"),
         E + "--out <files>/corpus/data lies inside the input <files>/corpus; write the output outside it",
         files={"corpus/a.txt": "The growth was strong. The police came.\n"}),
    Case("outputs", "predict-output-is-input",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.jsonl", "--output",
          "{files}/reviews.jsonl", "--overwrite"),
         E + "--output <files>/reviews.jsonl is also --input <files>/reviews.jsonl; write the output to another path",
         files={"reviews.jsonl": '{"text": "the growth"}\n'}),
    Case("outputs", "predict-output-is-a-directory",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.txt", "--output", "{files}/out"),
         E + "--output <files>/out is a directory; name a file, e.g. <files>/out/predictions.jsonl",
         files={"reviews.txt": "the growth\n", "out/keep.txt": "mine\n"}),
    Case("outputs", "predict-overwrite-foreign-file",
         (*DTRAIN, "predict", "--model", "{run_dir}", "--input", "{files}/reviews.txt", "--output",
          "{files}/notes.jsonl", "--overwrite"),
         E + "--output <files>/notes.jsonl exists and is a file dtrain did not write, not a predictions file of dtrain "
             "predict; choose another file (--overwrite replaces only a predictions file of dtrain predict)",
         files={"reviews.txt": "the growth\n", "notes.jsonl": '{"text": "mine"}\n'}),
    # -- concurrency: one run per run dir, one writer per output (flock locks that die with their process) ------------
    Case("concurrency", "run-dir-in-use", (*FINETUNE, "run_dir={held_run}"),
         E + "run_dir=<held_run> is in use by another dtrain run (<lock_holder>); wait for it to finish or stop it, "
             "or choose another run_dir"),
    Case("concurrency", "prepare-output-in-use",
         (*DTRAIN, "prepare", "pretrain", "{corpus}", "--out", "{held_out}", "--tokenizer", "{tokenizer}"),
         E + "--out <held_out> is being written by another dtrain process (<lock_holder>); wait for it to finish or "
             "choose another output"),
    # -- launch: slurm/*.sh outside Slurm, launch.torchrun, launch.submit ---------------------------------------------
    Case("launch", "slurm-missing-config", ("bash", "slurm/finetune.sh"),
         "dtrain-slurm: error: DTRAIN_CONFIG=configs/finetune/sentiment.yaml: no such file (relative paths start at "
         "<repo>)",
         env={"DTRAIN_CONFIG": "configs/finetune/sentiment.yaml", "DTRAIN_RUN_DIR": "{run_dir}"}),
    Case("continual", "teacher-with-other-labels",
         (*FINETUNE, "data.train={three_labels}", "distill.teacher={run_dir}"),
         E + "distill.teacher=<run_dir>: its labels ['neg', 'pos'] are not data.train's ['meh', 'neg', 'pos']; a "
             "teacher predicts the same labels in the same order (prepare data.train with --labels and the "
             "teacher's training set)"),
    Case("continual", "teacher-with-other-tokenizer", (*FINETUNE, "distill.teacher={retokenized_teacher}"),
         E + "distill.teacher=<retokenized_teacher>: its tokenizer (fingerprint <other_fingerprint>) is not the "
             "run's (<fingerprint>): the same ids would mean other words; use a teacher trained with the run's "
             "tokenizer (model.tokenizer)"),
    Case("continual", "student-layers-out-of-range",
         (*FINETUNE, "distill.teacher={run_dir}", "distill.student_layers=[0,7]"),
         E + "distill.student_layers=[0, 7]: the teacher <run_dir> has 2 encoder layers, numbered 0..1; give "
             "distinct layers in that range, e.g. [0]"),
    Case("continual", "replay-source-gone", (*FINETUNE, "model.init_from={gone_run}", "continual.replay_fraction=0.5"),
         E + "continual.replay_fraction: <gone_data>, which model.init_from=<gone_run> trained on, no longer exists "
             "(or has no manifest.json); restore it, or set continual.replay_data to a copy"),
    Case("continual", "replay-source-re-prepared",
         (*FINETUNE, "model.init_from={reprepared_run}", "continual.replay_fraction=0.5"),
         E + "continual.replay_fraction: <reprepared_data> no longer matches the manifest "
             "model.init_from=<reprepared_run> trained on (re-prepared since: its manifest.json changed); restore "
             "that data, or set continual.replay_data to replay the set as it is now"),
    Case("continual", "lwf-without-init-from", (*FINETUNE, "continual.distill_weight=1"),
         E + "continual.distill_weight distils from the model.init_from model; set model.init_from (or use "
             "distill.teacher)"),
    Case("windows", "windows-stride-too-large",
         (*PREPARE_FT, "{files}/reviews.jsonl", "--windows", "--max-seq-len", "16", "--doc-stride", "14"),
         E + "--doc-stride 14: consecutive windows share that many tokens, but a window holds 14 tokens of text at "
             "--max-seq-len 16; pass --doc-stride from 0 to 13 (e.g. 3)", files={"reviews.jsonl": TWO_LABELS}),
    Case("windows", "max-windows-zero", (*PREPARE_FT, "{files}/reviews.jsonl", "--windows", "--max-windows", "0"),
         E + "--max-windows 0: a document keeps at least 1 window; pass 1 or more (or leave it out: every window)",
         files={"reviews.jsonl": TWO_LABELS}),
    Case("windows", "doc-stride-without-windows",
         (*PREPARE_FT, "{files}/reviews.jsonl", "--doc-stride", "8"),
         E + "--doc-stride 8: the overlap of --windows (and of qa's windows), but task classification is not cut "
             "into windows here; add --windows or remove --doc-stride", files={"reviews.jsonl": TWO_LABELS}),
    Case("windows", "head-share-without-head-tail",
         (*PREPARE_FT, "{files}/reviews.jsonl", "--head-share", "0.5"),
         E + "--head-share 0.5: the share of the head in --truncation head_tail; add --truncation head_tail or "
             "remove --head-share", files={"reviews.jsonl": TWO_LABELS}),
    Case("windows", "window-pooling-undefined", (*PROMPT, "task.window_pooling=max"),
         E + "task.window_pooling=max: task prompt has no per-document output to pool or cut (ner labels tokens, qa "
             "windows its contexts itself, prompt wraps the whole text); remove it"),
    Case("windows", "eval-set-cut-differently", (*FINETUNE, "data.eval={windowed_dev}"),
         E + "data.eval=<windowed_dev> was prepared with --windows --doc-stride 8, data.train with prepare's default "
             "(head truncation); prepare it as data.train was, so that the model is evaluated on texts cut as it was "
             "trained (`dtrain evaluate` takes any set)"),
    Case("launch", "torchrun-nproc-not-a-number",
         (PY, "-m", "launch.torchrun", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml"),
         "launch.torchrun: error: DTRAIN_NPROC_PER_NODE='zero' is not a whole number; set it to an integer ≥ 1 or "
         "unset it",
         env={"DTRAIN_NPROC_PER_NODE": "zero"}),
    Case("launch", "torchrun-job-without-nodelist",
         (PY, "-m", "launch.torchrun", "dtrain.pretrain", "--config", "configs/pretrain/debug.yaml"),
         "launch.torchrun: error: SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside an sbatch/salloc job",
         env={"SLURM_JOB_ID": "4242"}),
    Case("launch", "submit-missing-config",
         (PY, "-m", "launch.submit", "pretrain", "--config", "{files}/phase1.yaml", "--local"),
         "launch.submit: error: --config <files>/phase1.yaml: no such file"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Earlier outputs, built once per session: what a bad command could touch (and must not)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> Path:
    return tokenizer_dir


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer with one more word: another vocabulary, another fingerprint."""
    return make_tokenizer(tmp_path_factory.mktemp("other_tokenizer"), extra=("zebra",))


def _fingerprint(path: Path) -> str:
    from dtrain.data.shards import tokenizer_fingerprint
    from dtrain.model.tokenizer import load_tokenizer

    return tokenizer_fingerprint(load_tokenizer(path))


@pytest.fixture(scope="session")
def fingerprint(tokenizer) -> str:
    return _fingerprint(tokenizer)


@pytest.fixture(scope="session")
def other_fingerprint(other_tokenizer) -> str:
    return _fingerprint(other_tokenizer)


@pytest.fixture(scope="session")
def data(pretrain_data) -> Path:
    """A prepared pretraining dataset (3 shards)."""
    return pretrain_data


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Raw text: a folder of .txt documents."""
    return make_corpus(tmp_path_factory.mktemp("raw") / "corpus", docs=6)


@pytest.fixture(scope="session")
def shard_bytes(data) -> str:
    return str(json.loads((data / "manifest.json").read_text())["shards"][0]["bytes"])


def _damaged_copy(data: Path, root: Path, damage: Callable[[bytes], bytes]) -> Path:
    copy = Path(shutil.copytree(data, root / "data"))
    shard = copy / "shard-00000.arrow"
    shard.write_bytes(damage(shard.read_bytes()))
    return copy


@pytest.fixture(scope="session")
def truncated(data, tmp_path_factory) -> Path:
    """The dataset with its first shard cut to 1000 bytes (a copy that did not finish)."""
    return _damaged_copy(data, tmp_path_factory.mktemp("truncated"), lambda b: b[:1000])


@pytest.fixture(scope="session")
def corrupted(data, tmp_path_factory) -> Path:
    """The dataset with 16 bytes inside the first shard flipped: the same size, another checksum."""
    def flip(b: bytes) -> bytes:
        middle = len(b) // 2
        return b[:middle] + bytes(x ^ 0xFF for x in b[middle:middle + 16]) + b[middle + 16:]

    return _damaged_copy(data, tmp_path_factory.mktemp("corrupted"), flip)


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Labelled train/dev/test sets (pos/neg), dev and test prepared with the training set's label map."""
    from tests.integration.test_training import write_sentiment

    return write_sentiment(tmp_path_factory.mktemp("sentiment"), tokenizer)


@pytest.fixture(scope="session")
def train(sentiment) -> Path:
    return sentiment["train"]


@pytest.fixture(scope="session")
def dev(sentiment) -> Path:
    return sentiment["dev"]


@pytest.fixture(scope="session")
def windowed_dev(tmp_path_factory, tokenizer, train) -> Path:
    """The dev rows prepared in windows (`--windows`), with the training set's labels."""
    from dtrain.tasks import prepare_finetune

    root = tmp_path_factory.mktemp("windowed")
    (root / "dev.jsonl").write_text(TWO_LABELS)
    prepare_finetune([str(root / "dev.jsonl")], root / "dev", str(tokenizer), max_seq_len=32, workers=1,
                     labels=str(train), windows=True)
    return root / "dev"


@pytest.fixture(scope="session")
def three_labels(tmp_path_factory, tokenizer) -> Path:
    """A training set with a third label (meh): the sentiment run's head does not fit its model."""
    from dtrain.tasks import prepare_finetune

    root = tmp_path_factory.mktemp("three_labels")
    rows = [{"text": f"the {word}", "label": label} for word, label in
            [("growth", "pos"), ("police", "neg"), ("market", "meh")] * 8]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_finetune([str(root / "rows.jsonl")], root / "data", str(tokenizer), max_seq_len=32, workers=1)
    return root / "data"


@pytest.fixture(scope="session")
def gpt_checkpoint(tmp_path_factory) -> Path:
    """A GPT-2 checkpoint dir (a tiny one) with BERT tokenizer files beside it: not a BERT model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=200)).save_pretrained(str(path))
    return make_tokenizer(path)


@pytest.fixture(scope="session")
def relabelled(tmp_path_factory, train) -> Path:
    """The training set with an edited labels.json: a third label inserted, so that ids shift."""
    path = Path(shutil.copytree(train, tmp_path_factory.mktemp("relabelled") / "train"))
    data = json.loads((path / "labels.json").read_text())
    (path / "labels.json").write_text(json.dumps({**data, "labels": ["neg", "unused", "pos"]}))
    return path


@pytest.fixture(scope="session")
def retokenized_teacher(tmp_path_factory, run_dir, other_tokenizer) -> Path:
    """The finished run's export with another tokenizer's files: a teacher whose ids mean other words."""
    path = Path(shutil.copytree(run_dir / "export", tmp_path_factory.mktemp("retokenized") / "export"))
    for f in other_tokenizer.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _run_copy_replaying(run_dir: Path, root: Path, data: Path) -> Path:
    """A copy of the finished run whose data.json says it trained on `data`."""
    run = Path(shutil.copytree(run_dir, root / "run"))
    record = json.loads((run / "data.json").read_text())
    record["train"] = {**record["train"], "path": str(data)}
    (run / "data.json").write_text(json.dumps(record))
    return run


@pytest.fixture(scope="session")
def gone_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gone") / "train"  # never made: the data the run trained on was deleted


@pytest.fixture(scope="session")
def gone_run(tmp_path_factory, run_dir, gone_data) -> Path:
    return _run_copy_replaying(run_dir, tmp_path_factory.mktemp("gone_run"), gone_data)


@pytest.fixture(scope="session")
def reprepared_data(tmp_path_factory, train) -> Path:
    """A copy of the training set, then re-prepared (its manifest.json is another one)."""
    path = Path(shutil.copytree(train, tmp_path_factory.mktemp("reprepared") / "train"))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "command": "dtrain prepare finetune (again)"}))
    return path


@pytest.fixture(scope="session")
def reprepared_run(tmp_path_factory, run_dir, train, reprepared_data) -> Path:
    return _run_copy_replaying(run_dir, tmp_path_factory.mktemp("reprepared_run"), reprepared_data)


@pytest.fixture(scope="session")
def bounded_tokenizer(tmp_path_factory, tokenizer) -> Path:
    """The test tokenizer with model_max_length 512, as BERT's tokenizers have."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bounded_tokenizer")
    AutoTokenizer.from_pretrained(str(tokenizer), model_max_length=512).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def long_train(tmp_path_factory, tokenizer) -> Path:
    """A training set of 602-token rows, prepared at --max-seq-len 1000 with a tokenizer that knows no limit."""
    from dtrain.tasks import prepare_finetune
    from tests.conftest import WORDS

    root = tmp_path_factory.mktemp("long_train")
    text = " ".join(WORDS[i % 60] for i in range(600))
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": text, "label": v}) + "\n" for v in ("pos", "neg") * 4))
    prepare_finetune([str(root / "rows.jsonl")], root / "data", str(tokenizer), max_seq_len=1000, workers=1)
    return root / "data"


@pytest.fixture(scope="session")
def lock_holder_process(tmp_path_factory) -> Iterator[dict[str, object]]:
    """Another live process holding the locks a running run (on held_run) and a running prepare (of held_out) hold."""
    root = tmp_path_factory.mktemp("held")
    run, out = root / "run", root / "data"
    run.mkdir()
    (run / "config.yaml").write_text("name: a run in progress\n")
    code = ("import sys, time; from dtrain.locks import acquire_lock; [acquire_lock(p, 'busy', 'x') for p in "
            "sys.argv[1:]]; print('held', flush=True); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / ".dtrain.lock"), str(root / ".data.lock")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    yield {"run": run, "out": out, "holder": f"host {socket.gethostname()}, pid {proc.pid}"}
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def held_run(lock_holder_process) -> Path:
    return lock_holder_process["run"]


@pytest.fixture(scope="session")
def held_out(lock_holder_process) -> Path:
    return lock_holder_process["out"]


@pytest.fixture(scope="session")
def lock_holder(lock_holder_process) -> str:
    return lock_holder_process["holder"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer, train) -> Path:
    """A finished fine-tuning run: config.yaml, checkpoints/step-00000001, export/, report.json, status.json."""
    path = tmp_path_factory.mktemp("finetuned") / "run"
    values = {"python": sys.executable, "train": train, "tokenizer": tokenizer, "new_run": path}
    command = [part.format_map(values) for part in FINETUNE] + ["schedule.max_steps=1"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (path / "checkpoints" / "step-00000001" / "trainer.json").is_file() and (path / "export").is_dir()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without Slurm's or dtrain's settings, offline, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DTRAIN_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "DTRAIN_PYTHON": sys.executable, **extra}


class Values(dict):
    """Placeholder → value: a few fixed ones, the rest from the session fixtures of the same name (built on use)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        super().__init__(python=sys.executable, repo=str(REPO), files=tmp_path / "files", new_run=tmp_path / "run")
        self.request = request

    def __missing__(self, name: str) -> object:
        self[name] = self.request.getfixturevalue(name)
        return self[name]


def fill(message: str, values: Values) -> str:
    """A catalogue message with its <placeholders> replaced (`<train dir>`, with a space, is part of a message)."""
    return re.sub(r"<([a-z_]+)>", lambda m: str(values[m.group(1)]), message)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root as (size, mtime_ns, sha256); directories by their existence only."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(path)] = ("dir",)
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.skipif(
    c.cpu_only and CUDA, reason="a GPU makes this input valid")]) for c in CASES])
def test_bad_input_fails_in_one_line_and_touches_nothing(case: Case, request, tmp_path):
    values = Values(request, tmp_path)
    for name, content in case.files.items():
        path = values["files"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    values["files"].mkdir(exist_ok=True)
    command = [part.format_map(values) for part in case.command]
    env = _env(**{k: v.format_map(values) for k, v in case.env.items()})
    expected = fill(case.message, values)
    # the earlier outputs: this case's files and every fixture path the command or message names
    watched = [v for k, v in values.items() if isinstance(v, Path) and k != "new_run" and v.exists()]
    before = {str(p): snapshot(p) for p in watched}

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)

    lines = result.stderr.splitlines()
    assert expected in lines, f"expected the line\n{expected}\nin stderr:\n{result.stderr[-3000:]}"
    assert lines[-1] == expected, f"not the last line of stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, f"exit status {result.returncode}"
    assert {str(p): snapshot(p) for p in watched} == before, "an earlier output was modified"


# ---------------------------------------------------------------------------------------------------------------------
# The catalogue and the tests agree
# ---------------------------------------------------------------------------------------------------------------------


def read_catalogue(path: Path = DOC) -> dict[str, tuple[str, str]]:
    """name → (category, message) from the Markdown table of docs/errors.md: | Category | Name | Bad input | Message
    | Fix |, the name in `...`, the message in ``...``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Category | Name |"))
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, f"{path}: a row without 5 cells: {line}"
        category, name, _, message, _ = cells
        assert name.startswith("`") and message.startswith("`` ") and message.endswith(" ``"), line
        assert name.strip("`") not in rows, f"{path}: {name} twice"
        rows[name.strip("`")] = (category, message[3:-3])
    return rows


def test_the_catalogue_and_the_tests_agree():
    documented = read_catalogue()
    tested = {c.name: (c.category, c.message) for c in CASES}
    assert len(tested) == len(CASES), "two cases with the same name"
    assert sorted(set(documented) - set(tested)) == [], "rows of docs/errors.md without a test case"
    assert sorted(set(tested) - set(documented)) == [], "test cases missing from docs/errors.md"
    for name, row in tested.items():
        assert documented[name] == row, f"{name}: docs/errors.md says {documented[name]}, the test {row}"
