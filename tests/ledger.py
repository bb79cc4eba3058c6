"""The sample ledger (logging.ledger=true): what a run trained on, step by step, and what it should have."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch


def read_ledger(run_dir: Path) -> dict[int, list[tuple[int, list[int]]]]:
    """{rank: [(step, ids), ...] in the order written} over all attempts (a rank appends to its own file)."""
    out = {}
    for path in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        out[int(path.stem.split("-")[1])] = [(r["step"], r["ids"]) for r in records]
    return out


class SampleIds:
    """A collator of the sample ids only; for pretraining it orders samples as the run's PretrainingCollator does
    (data.bucket_window sorts by the pairs' lengths, which that collator says)."""

    def __init__(self, cfg, data):  # noqa: ANN001
        if data.manifest.get("kind") == "pretrain":
            from dtrain.data.pretraining import PretrainingCollator
            from dtrain.model.tokenizer import tokenizer_for

            d = cfg.data
            self.bucket_lengths = PretrainingCollator(data, tokenizer_for(cfg), d.max_seq_len, cfg.seed,
                                                      d.mlm_probability, d.max_predictions_per_seq,
                                                      d.whole_word_masking, d.nsp_probability).bucket_lengths

    def __call__(self, batch: list[dict]) -> list[int]:
        return [int(s["index"]) for s in batch if not s["pad"]]


def expected_ledger(config: str, overrides: list[str], world_size: int, steps: int) -> dict[int, list[int]]:
    """{step: sorted sample ids of all ranks} of an uninterrupted run, from the same stream the trainer reads."""
    from dtrain import runner
    from dtrain.config import load_config
    from dtrain.data.shards import ShardedDataset

    cfg = load_config(config, overrides)
    data = ShardedDataset(cfg.data.train)
    accum = cfg.schedule.grad_accum_steps
    out = {s: [] for s in range(1, steps + 1)}
    collate = SampleIds(cfg, data)
    for rank in range(world_size):
        env = SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"))
        loader = runner.stream(cfg, data, collate, env, True)
        micro: list[list[int]] = []
        while len(micro) < steps * accum:
            micro.extend(loader)
        for s in range(1, steps + 1):
            out[s].extend(i for m in micro[(s - 1) * accum: s * accum] for i in m)
    return {s: sorted(ids) for s, ids in out.items()}


def assert_exactly_once(run_dir: Path, expected: dict[int, list[int]], world_size: int,
                        retrained: bool = False) -> None:
    """Every step of the schedule is in the final history of each rank (its last record of that step: a restart
    from a checkpoint trains the steps after it again), on exactly the samples an uninterrupted run trains at that
    step. Unless `retrained`, no step may have been trained twice at all (a preemption that saved loses nothing)."""
    ledger = read_ledger(run_dir)
    assert sorted(ledger) == list(range(world_size)), f"ranks with a ledger: {sorted(ledger)}"
    final: dict[int, list[int]] = {}
    for rank, records in ledger.items():
        steps = [s for s, _ in records]
        if not retrained:
            assert len(steps) == len(set(steps)), f"rank {rank} trained steps twice: {sorted(steps)}"
        for step, ids in dict(records).items():  # the last record of each step wins
            final.setdefault(step, []).extend(ids)
    assert sorted(final) == sorted(expected), f"steps trained: {sorted(final)}"
    wrong = [s for s, ids in final.items() if sorted(ids) != expected[s]]
    assert not wrong, f"steps that trained other samples than an uninterrupted run: {wrong[:10]}"
