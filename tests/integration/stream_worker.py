"""Run under torchrun: each rank streams its slice for several epochs, with a stop-and-resume in epoch 1, and
writes the sample ids it saw to <out>/rank<R>.json."""

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from dtrain.data.stream import StreamingDataset, StreamLoader


def ids(samples):
    return [(s["index"], s["pad"]) for s in samples]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--stop-after", type=int, default=3)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def loader():
        return StreamLoader(StreamingDataset(args.data, batch_size=3, seed=11, drop_last=False), ids, args.workers)

    seen = []
    ld = loader()
    for epoch in range(args.epochs):
        got = []
        for step, batch in enumerate(ld):
            got += [i for i, pad in batch if not pad]
            if epoch == 1 and step + 1 == args.stop_after:
                break  # "preempted": save the state, build everything anew, resume
        if epoch == 1:
            state = ld.state_dict()
            ld = loader()
            ld.load_state_dict(state)
            for batch in ld:
                got += [i for i, pad in batch if not pad]
        seen.append(got)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"epochs": seen, "world": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
