"""Files dtrain writes: a small file written so that a crash never leaves it half-written (a temp file beside it,
fsync, rename); output paths checked against the command's inputs (an output is never an input, never inside or
above one, never a run dir; --overwrite replaces only an earlier output of the same kind); the modes, leftovers and
full disks of output dirs. The locks against concurrent use are in dtrain/locks.py."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dtrain.errors import DtrainError
from dtrain.locks import output_lock


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and inputs: an output is never an input, never inside or above one, and --overwrite replaces only an
# earlier output of the same kind
# ---------------------------------------------------------------------------------------------------------------------

DATASET, EXPORT, PREDICTIONS, REPORT = "dataset", "export", "predictions", "report"
_DIR_KINDS = {DATASET: "a dataset dir (manifest.json and shards, from `dtrain prepare`)",
              EXPORT: "an export dir (config.json, weights and tokenizer files, from `dtrain export`)"}
_FILE_KINDS = {PREDICTIONS: "a predictions file of dtrain predict", REPORT: "a report of dtrain evaluate"}
_DATASET_FILES = re.compile(r"^(manifest\.json|labels\.json|examples\.jsonl|shard-\d{5,}\.arrow)$")
_EXPORT_FILES = re.compile(r"^(config\.json|generation_config\.json|adapter_config\.json|README\.md|vocab\.txt|"
                           r"dtrain_adapters\.(json|safetensors)|"
                           r"special_tokens_map\.json|added_tokens\.json|merges\.txt|tokenizer(_config)?\.json|"
                           r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?)$")
_WEIGHTS = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# the fields `dtrain predict` adds to every row, per task (classification, multilabel, ner, qa, regression)
_PREDICTION_FIELDS = ({"label", "score", "probabilities"}, {"labels", "probabilities"}, {"entities"},
                      {"answer", "score", "start", "end"}, {"score"})


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))  # symlinks resolved, also for parts that do not exist yet


def _is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "status.json").is_file() or (path / "config.yaml").is_file()


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def output_kind(path: Path) -> str | None:
    """What dtrain output an existing path is (DATASET, EXPORT, PREDICTIONS, REPORT), or None (anything else).

    A dataset dir: a dtrain manifest.json, and only the files `dtrain prepare` writes. An export dir: config.json or
    adapter_config.json, a weights file, and only the files save_pretrained writes (so exports of earlier versions,
    which carry no marker, are recognised too). A predictions file: JSON lines, each an object with the fields
    `dtrain predict` adds for one task (label+score+probabilities, labels+probabilities, entities,
    answer+score+start+end, or score). A report: one JSON object with the model and data `dtrain evaluate` names.
    """
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        manifest = _json(path / "manifest.json")
        if isinstance(manifest, dict) and manifest.get("format") == "dtrain-shards" and all(
                _DATASET_FILES.match(n) for n in names):
            return DATASET
        if ({"config.json", "adapter_config.json"} & set(names) and any(_WEIGHTS.match(n) for n in names)
                and all(_EXPORT_FILES.match(n) for n in names)):
            return EXPORT
        return None
    if not path.is_file():
        return None
    report = _json(path)
    if isinstance(report, dict) and isinstance(report.get("model"), str) and isinstance(report.get("data"), str) \
            and _number(report.get("loss")):  # every report has the evaluation's loss
        return REPORT
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if rows and all(isinstance(r, dict) and _prediction(r) for r in rows):
        return PREDICTIONS
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _prediction(row: dict) -> bool:
    """The row carries one task's prediction fields, with the types `dtrain predict` writes."""
    fits = [fields for fields in _PREDICTION_FIELDS if fields <= row.keys()]
    if not fits:
        return False
    typed = {"score": _number, "start": lambda v: isinstance(v, int), "end": lambda v: isinstance(v, int),
             "probabilities": lambda v: isinstance(v, dict), "labels": lambda v: isinstance(v, list),
             "entities": lambda v: isinstance(v, list)}
    return any(all(typed.get(k, lambda v: True)(row[k]) for k in fields) for fields in fits)


def _what(path: Path) -> str:
    if path.is_dir():
        if _is_run_dir(path):
            return "a run dir"
        kind = output_kind(path)
        if kind:
            return _DIR_KINDS[kind].split(" (")[0]
        return "a folder of other files"
    kind = output_kind(path)
    return _FILE_KINDS[kind] if kind else "a file dtrain did not write" if path.is_file() else "not a regular file"


def check_apart(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]], label: str,
                error: type[DtrainError] = DtrainError) -> None:
    """Refuse an output (named `label` in the message) that is one of `inputs`, lies inside one or contains one
    (symlinks resolved). `inputs`: (name, path) pairs; None is skipped."""
    real = _real(out)
    for name, given in inputs:
        if given is None:
            continue
        other = _real(given)
        if real == other:
            raise error(f"{label} is also {name} {given}; write the output to another path")
        if other in real.parents:
            raise error(f"{label} lies inside {name} {given}; write the output outside it")
        if real in other.parents:
            raise error(f"{label} contains {name} {given}; write the output to a path that does not hold the "
                        f"command's inputs")


def place_problem(path: Path, label: str, what: str, elsewhere: str, writable: str) -> str | None:
    """Why `path` (named `label`; `what`: how the message calls it) cannot be made where it is, or None: it lies
    under a file (`elsewhere`: the fix), or nothing can be created in the folder it would go in (`writable`: the
    fix; /proc, /sys, a read-only mount, no permission: found by a probe file that is removed again). A path that
    exists is checked as it is (a directory must take new files)."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder != path and not folder.is_dir():
        return f"{label}: {folder} is a file, so {what} cannot be created under it; {elsewhere}"
    if not folder.is_dir():
        return None  # an existing file: what may replace it is the caller's question
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dtrain-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{label}: cannot create files in {folder} ({e.strerror}); {writable}"
    return None


def check_output(out: str | os.PathLike, kind: str, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                 overwrite: bool, flag: str, error: type[DtrainError] = DtrainError) -> None:
    """Refuse (`error`, a DtrainError: one line naming the path and the fix; nothing touched) an output path that

    - is one of the command's inputs, lies inside one or contains one (symlinks resolved): `dtrain export RUN RUN`,
      `predict --input F --output F`, `prepare corpus/ --out corpus/`;
    - is a file where a directory goes, or a directory where a file goes, or lies under a file;
    - exists (not empty) without `overwrite`; or, with it, is not an earlier output of the same `kind` (a dataset dir,
      an export dir, a predictions file, an evaluation report; see `output_kind`): a run dir, another kind of output,
      a folder of other files, a file dtrain did not write.

    `inputs`: (name for the message: "--input", "the checkpoint", "--tokenizer" ..., path) pairs; None is skipped.
    An empty directory or an empty file holds nothing to lose and is always taken.
    """
    path, real = Path(out), _real(out)
    check_apart(out, inputs, f"{flag} {out}", error)
    if not os.path.lexists(path) and not real.exists():
        problem = place_problem(real, f"{flag} {out}", str(out), "choose another path",
                                "choose a path in a folder you can write")
        if problem:
            raise error(problem)
        return
    is_dir_kind = kind in _DIR_KINDS
    if is_dir_kind and not real.is_dir():
        raise error(f"{flag} {out} is {_what(real)}, not a directory; choose a new directory for the output")
    if not is_dir_kind and real.is_dir():
        example = path / ("predictions.jsonl" if kind == PREDICTIONS else "report.json")
        raise error(f"{flag} {out} is a directory; name a file, e.g. {example}")
    if (real.is_dir() and not any(real.iterdir())) or (real.is_file() and real.stat().st_size == 0):
        return
    same = output_kind(real) == kind
    if same and not overwrite:
        if is_dir_kind:
            raise error(f"{out} already exists and is not empty; choose another output dir or pass --overwrite")
        raise error(f"{flag} {out} exists; pass --overwrite or choose another file")
    if not same:
        described = (_DIR_KINDS if is_dir_kind else _FILE_KINDS)[kind].split(" (")[0]
        raise error(f"{flag} {out} exists and is {_what(real)}, not {described}; choose another "
                          f"{'output dir' if is_dir_kind else 'file'} (--overwrite replaces only {described})")


# ---------------------------------------------------------------------------------------------------------------------
# Building an output dir: modes, leftovers of a killed writer, a full disk
# ---------------------------------------------------------------------------------------------------------------------


def umask() -> int:
    """This process's umask (from /proc when there, so that no thread ever sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalise_modes(root: Path) -> None:
    """Give everything under `root` (and root) the mode a plain open()/mkdir() would: 0666/0777 less the umask.
    mkdtemp makes 0700 dirs, and safetensors (0.8) writes model.safetensors through a private 0600 temp file."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(base, name), 0o666 & ~mask)


def remove_leftovers(out: Path, flag: str) -> None:
    """Remove the hidden `.<name>.tmp-*` / `.<name>.old-*` beside `out` that a killed writer left (call it only while
    holding `out`'s lock: then no live dtrain is writing them). An earlier output caught between the two renames of a
    replacement (`out` missing, `.<name>.old-*/old` there) is put back instead."""
    import shutil

    name = glob.escape(out.name)  # an output named `a*` must not match another output's leftovers
    found = sorted(p for pattern in (f".{name}.tmp-*", f".{name}.old-*") for p in out.parent.glob(pattern))
    if not found:
        return
    restored = None
    for path in found:
        if path.name.startswith(f".{out.name}.old-") and (path / "old").is_dir() and not os.path.lexists(out):
            os.replace(path / "old", out)
            restored = path
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    names = ", ".join(p.name for p in found)
    print(f"dtrain: warning: {flag} {out}: removed {names} left by an earlier dtrain that was stopped while writing "
          f"it" + (f" (the earlier output in {restored.name} was put back first)" if restored else ""),
          file=sys.stderr)


def disk_full(e: OSError) -> bool:
    text = str(e)
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "Disk quota" in text


def disk_full_message(out: Path, flag: str) -> str:
    import shutil

    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return (f"{flag} {out}: the disk filled up while writing it ({free / 2**20:.1f} MiB free in {folder}); free "
            f"space or choose another output on a larger disk (nothing was replaced; the partial output was removed)")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
                      flag: str = "--out", error: type[DtrainError] = DtrainError) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `out` only if the block finishes.

    An existing non-empty `out` is refused unless `overwrite`; then it is replaced only after the new one is complete,
    so an interrupted or failed run leaves the earlier dataset as it was and nothing that looks like a dataset.
    With `kind` (a user's command: DATASET or EXPORT) the output is locked while it is built (a second
    dtrain writing it is refused), checked again under the lock (`check_output`: --overwrite replaces only an
    earlier output of that kind), and what a killed writer left beside it is removed first. The files get the modes
    the umask gives; a disk that fills up is one line (`error`).
    """
    out = Path(out)
    with contextlib.ExitStack() as stack:
        if kind is not None:
            stack.enter_context(output_lock(out, flag))
            check_output(out, kind, (), overwrite, flag, error)
            remove_leftovers(out, flag)
        elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise error(f"{out} already exists and is not empty; choose another output dir or pass --overwrite")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        except OSError as e:
            raise error(f"{flag} {out}: cannot be created ({e.strerror}); choose a path in a folder you can "
                             f"write") from None
        try:
            yield tmp
            normalise_modes(tmp)
            empty = out.is_dir() and not any(out.iterdir())  # an empty dir holds nothing to lose: renamed over
            if out.exists() and not empty:
                if not overwrite:  # made by someone else while this one was built: never replaced unasked
                    raise error(f"{out} appeared while this output was being written; choose another output "
                                     f"dir or pass --overwrite")
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.replace(out, old / "old")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as e:
            if not disk_full(e):
                raise
            raise error(disk_full_message(out, flag)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
