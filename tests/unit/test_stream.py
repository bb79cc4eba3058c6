"""StreamingDataset: exactly-once per epoch over ranks × workers, a world-size-free global order, exact and elastic
resume."""

import random
from collections import Counter

import numpy as np
import pytest

from dtrain.data.shards import ShardedDataset
from dtrain.data.stream import EpochOrder, StreamingDataset, StreamLoader
from dtrain.errors import DtrainError


def ids_only(samples):
    return {"index": [s["index"] for s in samples], "pad": [s["pad"] for s in samples]}


def loaders(path, world, batch, workers=0, **kw):
    return [StreamLoader(StreamingDataset(path, batch, seed=7, rank=r, world_size=world, **kw), ids_only, workers)
            for r in range(world)]


def run_epoch(loaders_, max_batches=None):
    """Step all ranks together (as training does); return each rank's sample ids, in order."""
    per_rank = [[] for _ in loaders_]
    iters = [iter(ld) for ld in loaders_]
    steps = 0
    while max_batches is None or steps < max_batches:
        try:
            batches = [next(it) for it in iters]
        except StopIteration:
            break
        for r, b in enumerate(batches):
            per_rank[r] += [i for i, p in zip(b["index"], b["pad"], strict=True) if not p]
        steps += 1
    return per_rank, iters


def global_order(per_rank):
    """Rank r's k-th sample sits at global position k*W + r."""
    world = len(per_rank)
    out = [None] * sum(len(x) for x in per_rank)
    for r, samples in enumerate(per_rank):
        for k, s in enumerate(samples):
            out[k * world + r] = s
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch(pretrain_data, world, workers):
    n = len(ShardedDataset(pretrain_data))
    lds = loaders(pretrain_data, world, batch=3, workers=workers, drop_last=False)
    epochs = []
    for _ in range(3):
        per_rank, _ = run_epoch(lds)
        flat = [s for r in per_rank for s in r]
        assert Counter(flat) == Counter(range(n))  # the multiset of ids is the dataset, exactly
        assert len({len(r) for r in per_rank}) <= 2  # ranks differ by at most the padding of one batch
        epochs.append(global_order(per_rank))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_same_global_order_for_any_world_size_and_worker_count(pretrain_data):
    n = len(ShardedDataset(pretrain_data))
    orders = {}
    for world, workers in [(1, 0), (2, 0), (4, 2), (2, 2)]:
        per_rank, _ = run_epoch(loaders(pretrain_data, world, batch=2, workers=workers, drop_last=False))
        orders[(world, workers)] = global_order(per_rank)[:n]
    reference = orders[(1, 0)]
    assert sorted(reference) == list(range(n))
    for key, order in orders.items():
        assert order[: n - n % 8] == reference[: n - n % 8], key


def test_drop_last_yields_whole_global_batches_only(pretrain_data):
    n = len(ShardedDataset(pretrain_data))
    per_rank, _ = run_epoch(loaders(pretrain_data, 2, batch=5, drop_last=True))
    assert all(len(r) == (n // 10) * 5 for r in per_rank)
    assert len(set(per_rank[0]) | set(per_rank[1])) == (n // 10) * 10


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_remaining_stream(pretrain_data, workers):
    full, _ = run_epoch(loaders(pretrain_data, 2, batch=3, workers=workers, drop_last=False))
    rng = random.Random(0)
    for k in sorted(rng.sample(range(1, len(full[0]) // 3), 3)):
        first = loaders(pretrain_data, 2, batch=3, workers=workers, drop_last=False)
        head, _ = run_epoch(first, max_batches=k)
        states = [ld.state_dict() for ld in first]
        assert states[0] == states[1] and states[0]["position"] == k * 6
        second = loaders(pretrain_data, 2, batch=3, workers=workers, drop_last=False)
        for ld, st in zip(second, states, strict=True):
            ld.load_state_dict(st)
        tail, _ = run_epoch(second)
        for r in range(2):
            assert head[r] + tail[r] == full[r], (k, r)


def test_resume_across_epochs_continues_the_next_epoch(pretrain_data):
    reference = loaders(pretrain_data, 1, batch=4, drop_last=True)
    ep0, _ = run_epoch(reference)
    ep1, _ = run_epoch(reference)
    assert reference[0].state_dict()["epoch"] == 2
    first = loaders(pretrain_data, 1, batch=4, drop_last=True)
    run_epoch(first)
    resumed = loaders(pretrain_data, 1, batch=4, drop_last=True)
    resumed[0].load_state_dict(first[0].state_dict())
    again, _ = run_epoch(resumed)
    assert again == ep1


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4), (4, 3)])
def test_elastic_resume_loses_and_repeats_nothing(pretrain_data, before, after):
    n = len(ShardedDataset(pretrain_data))
    first = loaders(pretrain_data, before, batch=3, drop_last=False)
    head, _ = run_epoch(first, max_batches=5)
    state = first[0].state_dict()
    second = loaders(pretrain_data, after, batch=2, workers=0, drop_last=False)
    for ld in second:
        ld.load_state_dict(state)
    tail, _ = run_epoch(second)
    seen = [s for r in head for s in r] + [s for r in tail for s in r]
    assert Counter(seen) == Counter(range(n))
    # and the continuation follows the same global order as an uninterrupted single-rank epoch
    ref, _ = run_epoch(loaders(pretrain_data, 1, batch=1, drop_last=False))
    continued = global_order(tail)
    keep = len(continued) - 8  # the last global batch may hold padding repeats
    assert continued[:keep] == ref[0][state["position"]:][:keep]


def test_state_from_another_dataset_is_refused(pretrain_data):
    ld = loaders(pretrain_data, 1, batch=2)[0]
    state = ld.state_dict() | {"num_samples": 5}
    with pytest.raises(DtrainError, match=r"covered 5 samples but .* has \d+; resume with the dataset"):
        ld.load_state_dict(state)


def test_block_shuffle_and_bucketing_are_permutations():
    rows = [7, 13, 1, 29, 50]
    lengths = np.random.default_rng(0).integers(5, 500, size=sum(rows))
    for kw in [dict(shuffle_block=16), dict(shuffle_block=1 << 16), dict(shuffle=False),
               dict(shuffle_block=32, lengths=lengths, bucket_window=64)]:
        order = EpochOrder(rows, seed=3, epoch=1, **kw)
        ids = order.ids(np.arange(sum(rows)))
        assert sorted(ids.tolist()) == list(range(sum(rows))), kw
    unshuffled = EpochOrder(rows, seed=3, epoch=1, shuffle=False).ids(np.arange(sum(rows)))
    assert unshuffled.tolist() == list(range(sum(rows)))


def test_bucketing_groups_similar_lengths(pretrain_data):
    data = ShardedDataset(pretrain_data)
    lengths = data.column("length")
    per_rank, _ = run_epoch(loaders(pretrain_data, 1, batch=8, bucket_window=64, drop_last=True))
    batches = [per_rank[0][i:i + 8] for i in range(0, len(per_rank[0]), 8)]
    spread_bucketed = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    plain, _ = run_epoch(loaders(pretrain_data, 1, batch=8, drop_last=True))
    batches = [plain[0][i:i + 8] for i in range(0, len(plain[0]), 8)]
    spread_plain = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread_bucketed < spread_plain / 3


def test_resuming_inside_an_epoch_with_another_bucket_window_is_refused(pretrain_data):
    ld = loaders(pretrain_data, 1, batch=2, bucket_window=64)[0]
    next(iter(ld))
    state = ld.state_dict()
    assert state["bucket_window"] == 64 and state["position"] == 2
    plain = loaders(pretrain_data, 1, batch=2)[0]
    with pytest.raises(DtrainError, match=r"inside an epoch ordered with data\.bucket_window=64, this run sets 0: "
                                          r"the rest of the epoch would repeat and skip samples; resume with "
                                          r"data\.bucket_window=64"):
        plain.load_state_dict(state)
    plain.load_state_dict(state | {"position": 0})  # at an epoch's start the order may change
    plain.load_state_dict({k: v for k, v in state.items() if k != "bucket_window"})  # a state from before: taken
