"""Real `torchrun --nproc_per_node=2` on CPU (gloo): exactly-once per epoch over ranks × workers, resume included,
and the same global order as a single process."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dtrain.data.shards import ShardedDataset
from dtrain.data.stream import StreamingDataset, StreamLoader

WORKER = Path(__file__).with_name("stream_worker.py")


@pytest.mark.parametrize("workers", [0, 2])
def test_torchrun_two_ranks_exactly_once_with_resume(pretrain_data, tmp_path, workers):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(pretrain_data), str(tmp_path), "--workers", str(workers), "--epochs", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = len(ShardedDataset(pretrain_data))
    single = StreamLoader(StreamingDataset(pretrain_data, batch_size=1, seed=11, rank=0, world_size=1,
                                           drop_last=False), lambda s: [x["index"] for x in s])
    orders = []
    for epoch in range(3):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert Counter(per_rank[0] + per_rank[1]) == Counter(range(n)), epoch
        interleaved = [s for pair in zip(*per_rank, strict=False) for s in pair]
        reference = [i for batch in single for i in batch]
        assert interleaved == reference[: len(interleaved)]
        orders.append(interleaved)
    assert orders[0] != orders[1] != orders[2]
