"""The real MiniLM checkpoint in dtrain's pretraining model: quiet load, fresh heads, HF round trip."""

import pytest
import torch

from dtrain.data.examples import example_path
from dtrain.model.bert import fresh_summary, pretraining_model

pytestmark = pytest.mark.network


def test_minilm_loads_quietly_with_fresh_heads_and_round_trips(tmp_path, capfd):
    from transformers import AutoModelForPreTraining

    minilm = example_path("minilm")

    model, fresh = pretraining_model(str(minilm))
    captured = capfd.readouterr()
    assert "corrupted" not in captured.err + captured.out and "newly initialized" not in captured.err
    assert fresh_summary(fresh) == "fresh (not in the checkpoint): cls.predictions, cls.seq_relationship"
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForPreTraining.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
