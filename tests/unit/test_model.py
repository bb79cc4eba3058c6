"""BERT from presets and checkpoints; the MLM head on masked positions only equals the full head."""

import pytest
import torch

from dtrain.data.pretraining import IGNORE, PretrainingCollator
from dtrain.data.shards import ShardedDataset
from dtrain.data.stream import as_tensors
from dtrain.errors import DtrainError
from dtrain.model.bert import count_parameters, pretraining_counts, pretraining_losses, pretraining_model
from dtrain.model.presets import PRESETS, preset_config
from dtrain.model.tokenizer import load_tokenizer


def test_preset_shapes():
    base = preset_config("bert-base-uncased")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.vocab_size) == (768, 12, 12,
                                                                                                    30522)
    assert preset_config("bert-large-cased").vocab_size == 28996 and set(PRESETS) >= {"tiny", "bert-large-uncased"}
    model, fresh = pretraining_model("preset:bert-base-uncased")  # random init only when asked for
    assert 109e6 < count_parameters(model) < 111e6  # BERT-base with its MLM/NSP heads: 110M
    assert model.config._attn_implementation == "sdpa" and fresh


def test_unknown_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DtrainError, match=r"model\.name_or_path=bert-huge: no such local dir, not in the Hugging "
                                          r"Face cache \(.*hf-cache\), and the Hub is not reachable"):
        pretraining_model("bert-huge")
    with pytest.raises(DtrainError, match=r"no preset 'bert-huge'; the random-init presets are preset:tiny, "):
        pretraining_model("preset:bert-huge")
    with pytest.raises(DtrainError, match=r"no config\.json in the dir, so not a Hugging Face checkpoint"):
        pretraining_model(str(tmp_path))


def test_masked_position_head_equals_the_full_head(pretrain_data, tokenizer_dir):
    torch.manual_seed(0)
    model, _ = pretraining_model("tiny")
    model.eval()
    data = ShardedDataset(pretrain_data)
    collate = PretrainingCollator(data, load_tokenizer(tokenizer_dir), 64, seed=1)
    batch = as_tensors(collate([data[i] | {"index": i, "epoch": 0, "pad": i == 5} for i in range(8)]))
    ours, counts = pretraining_losses(model, batch), pretraining_counts(batch)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    rows = torch.arange(8)[:, None].expand_as(batch["mlm_positions"])
    keep = batch["mlm_labels"] != IGNORE
    labels[rows[keep], batch["mlm_positions"][keep]] = batch["mlm_labels"][keep]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], labels=labels,
                     next_sentence_label=batch["next_sentence_label"])
    mlm = ours["mlm"] / counts["mlm"]
    nsp = ours["nsp"] / counts["nsp"]
    assert int(counts["nsp"]) == 7 and int(counts["mlm"]) == int(keep.sum())
    assert torch.allclose(mlm + nsp, full.loss, atol=1e-5)
