"""The sample ledger (logging.ledger=true): what a run trained on, step by step, and what it should have."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch


def read_ledger(run_dir: Path) -> dict[int, list[list[int]]]:
    """{step: [the ids of every record of that step, one list per record and rank]} over all ranks and attempts."""
    steps: dict[int, list[list[int]]] = {}
    for path in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).append(record["ids"])
    return steps


def expected_ledger(config: str, overrides: list[str], world_size: int, steps: int) -> dict[int, list[int]]:
    """{step: sorted sample ids of all ranks} of an uninterrupted run, from the same stream the trainer reads."""
    from dtrain import runner
    from dtrain.config import load_config
    from dtrain.data.shards import ShardedDataset

    cfg = load_config(config, overrides)
    data = ShardedDataset(cfg.data.train)
    accum = cfg.schedule.grad_accum_steps
    out = {s: [] for s in range(1, steps + 1)}
    for rank in range(world_size):
        env = SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"))
        loader = runner.stream(cfg, data, lambda batch: [int(s["index"]) for s in batch if not s["pad"]], env, True)
        micro: list[list[int]] = []
        while len(micro) < steps * accum:
            micro.extend(loader)
        for s in range(1, steps + 1):
            out[s].extend(i for m in micro[(s - 1) * accum: s * accum] for i in m)
    return {s: sorted(ids) for s, ids in out.items()}


def assert_exactly_once(run_dir: Path, expected: dict[int, list[int]], world_size: int) -> None:
    """Every step of the schedule was trained once (one record per rank, none repeated after a resume) on exactly
    the samples an uninterrupted run trains on at that step."""
    ledger = read_ledger(run_dir)
    assert sorted(ledger) == sorted(expected), f"steps trained: {sorted(ledger)}"
    repeated = {s: len(r) for s, r in ledger.items() if len(r) != world_size}
    assert not repeated, f"steps recorded more or less than once per rank: {repeated}"
    wrong = [s for s, records in ledger.items() if sorted(i for r in records for i in r) != expected[s]]
    assert not wrong, f"steps that trained other samples than an uninterrupted run: {wrong[:10]}"
