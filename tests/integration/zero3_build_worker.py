"""Run under torchrun with 2 ranks: builds a model as dtrain's entry points do under ZeRO-3 (pretraining from a
checkpoint dir) and writes what this rank holds to <out>/rank<R>.json."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist


def held(model):
    """(elements this rank stores, elements of the whole model, the whole model's weights gathered)."""
    import deepspeed

    from dtrain.model.bert import count_parameters

    params = list({id(p): p for p in model.parameters()}.values())
    own = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in params)
    whole = count_parameters(model)
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return own, whole, weights


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import BertForPreTraining
    from transformers.integrations import is_deepspeed_zero3_enabled

    from dtrain.config import load_config
    from dtrain.distributed import DistEnv
    from dtrain.engine import model_building
    from dtrain.model.bert import pretraining_model

    cfg = load_config("configs/pretrain/debug.yaml", ["parallel.engine=deepspeed", "parallel.zero_stage=3"])
    env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"), "gloo")
    with model_building(cfg, env):
        model, fresh = pretraining_model(args.checkpoint)
    own, whole, weights = held(model)
    reference = BertForPreTraining.from_pretrained(args.checkpoint).state_dict()  # (outside: a plain model)
    same = all(torch.equal(weights[k], v) for k, v in reference.items())
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "own": own, "whole": whole, "fresh": fresh, "same_weights": same, "after": is_deepspeed_zero3_enabled(),
        "plain_after": not any(hasattr(p, "ds_id") for p in BertForPreTraining.from_pretrained(
            args.checkpoint).parameters())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
