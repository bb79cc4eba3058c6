import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, why_unavailable


def _required() -> bool:
    """In CI (or with DTRAIN_REQUIRE_SLURM=1) the Slurm tests must run: a cluster that cannot start fails them."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return ci or os.environ.get("DTRAIN_REQUIRE_SLURM") == "1"


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"Slurm tests are required here (CI / DTRAIN_REQUIRE_SLURM=1), but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A real single-node Slurm cluster, started once per session (installing Slurm if needed)."""
    if reason := why_unavailable():
        _unavailable(reason)
    cluster = SlurmCluster()
    try:
        try:
            cluster.start()
        except SlurmUnavailable as e:  # e.g. no network to install from; a daemon that fails to start is an error
            _unavailable(str(e))
        yield cluster
    finally:
        cluster.stop()
