"""The rules of the house (../shared/ARCHITECTURE.md) as checks on the source: one-way imports, no task-name switch
outside dtrain/tasks, the task list written once, modules of a readable size, a Trainer built from few arguments."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import dtrain

ROOT = Path(dtrain.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py"))
TOKENIZER_SIDE = {"dtrain.model.source", "dtrain.model.bounds", "dtrain.model.tokenizer", "dtrain.model.presets"}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dtrain module the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dtrain"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from dtrain.model import peft`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dtrain"))
    known = {_name(p) for p in MODULES}
    return {m for m in found if m in known}


def test_imports_run_one_way():
    problems = []
    for path in MODULES:
        me, deps = _name(path), _imports(path)
        for dep in deps:
            if me.startswith("dtrain.data") and (dep.startswith(("dtrain.engine", "dtrain.tasks"))
                                                 or dep.startswith("dtrain.model") and dep not in TOKENIZER_SIDE):
                problems.append(f"{me} imports {dep} (data/ uses only the torch-free source/bounds/tokenizer of "
                                f"model/)")
            if me.startswith("dtrain.engine") and dep.startswith(("dtrain.data", "dtrain.tasks")):
                problems.append(f"{me} imports {dep} (engine/ knows no data or task)")
            if me.startswith(("dtrain.model", "dtrain.data")) and dep.startswith("dtrain.tasks"):
                problems.append(f"{me} imports {dep} (tasks/ sits above data/ and model/)")
            if me.startswith(("dtrain.model", "dtrain.data", "dtrain.engine", "dtrain.tasks")) \
                    and dep.startswith("dtrain.methods"):
                problems.append(f"{me} imports {dep} (methods/ sits above tasks/, model/ and data/)")
            if dep in ("dtrain.pretrain", "dtrain.finetune") and me != "dtrain.cli":
                problems.append(f"{me} imports the entry point {dep}")
            if dep == "dtrain.runner" and me not in ("dtrain.pretrain", "dtrain.finetune"):
                problems.append(f"{me} imports dtrain.runner (only the entry points do)")
    assert not problems, "\n".join(problems)


def test_no_task_name_switch_outside_the_task_modules():
    switch = re.compile(r"task (==|!=|in) ")
    hits = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}" for p in MODULES if "tasks" not in p.parts
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if switch.search(line)]
    assert not hits, "\n".join(hits)
    # the task names are written once: in the registry (their modules name themselves)
    for path in MODULES:
        if "tasks" not in path.parts:
            text = path.read_text(encoding="utf-8")
            assert not re.search(r'"multilabel",\s*"regression"', text), f"{path}: a list of task names"


def test_modules_stay_readable_and_the_trainer_takes_few_arguments():
    from dtrain.trainer import Trainer

    long = [f"{p.relative_to(ROOT.parent)}: {n} lines" for p in MODULES
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400]
    assert not long, "\n".join(long)
    for entry in ("pretrain.py", "finetune.py"):
        assert len((ROOT / entry).read_text(encoding="utf-8").splitlines()) <= 100, entry
    assert len(inspect.signature(Trainer.__init__).parameters) - 1 <= 8
