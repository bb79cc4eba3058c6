"""Checkpointer bookkeeping: `latest`, `best`, and keep-last pruning that never removes the best checkpoint."""

from pathlib import Path

import torch

from dtrain.checkpoint import Checkpointer
from dtrain.distributed import DistEnv


class FakeEngine:
    def save(self, path: Path) -> None:
        (path / "engine.pt").write_text("weights")


def test_pruning_keeps_the_best_checkpoint_apart(tmp_path):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ckpt = Checkpointer(tmp_path, env, keep_last=2, config_yaml="cfg: 1\n")
    for step in range(1, 7):
        ckpt.save(step, {"engine": FakeEngine()}, best=step == 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000005", "step-00000006"]
    assert ckpt.best().name == "step-00000002" and ckpt.latest().name == "step-00000006"
    ckpt.save(7, {"engine": FakeEngine()}, best=True)  # a new best: the old one is pruned as usual
    assert ckpt.best().name == "step-00000007"
    ckpt.save(8, {"engine": FakeEngine()})
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000006", "step-00000007", "step-00000008"]
