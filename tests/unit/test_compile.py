"""model.compile: the compiled encoder computes what the eager one does, and compiles once, not once per shape."""

import copy

import pytest
import torch
import transformers

from dtrain.model.bert import set_encoder
from tests.unit.test_unpad import config


def batch(lengths, width, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return torch.randint(5, 120, (len(lengths), width), generator=g) * mask, mask


@pytest.mark.parametrize("unpad", [True, False])
def test_compiled_encoder_equals_eager_and_does_not_recompile_after_warm_up(unpad):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = transformers.BertForSequenceClassification(config(num_labels=2)).eval()
    model = set_encoder(copy.deepcopy(eager), unpad=unpad, compile=True)
    assert model.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod prefixes: checkpoints unchanged
    shapes = [([9, 4, 7], 9), ([12, 12, 3, 5], 12),  # warm-up: two shapes (the first and a second, dynamic one)
              ([6, 2], 6), ([20, 11, 8, 1, 15], 20), ([5, 5, 5], 5), ([16, 3], 16)]
    graphs = None
    for i, (lengths, width) in enumerate(shapes):
        if i == 2:
            graphs = counters["stats"]["unique_graphs"]
        ids, mask = batch(lengths, width, i)
        model.train()  # backward through the compiled graph too
        model(input_ids=ids, attention_mask=mask, labels=torch.zeros(len(lengths), dtype=torch.long)).loss.backward()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                       eager(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert graphs and counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"


def test_compile_is_refused_under_zero3():
    from dtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.compile=true with DeepSpeed ZeRO-3"):
        load_config("configs/pretrain/debug.yaml", ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                                                    "model.compile=true"])
