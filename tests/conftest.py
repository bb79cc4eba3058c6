import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `dtrain ...` as a user would (a fresh process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "dtrain", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli():
    return run_cli
