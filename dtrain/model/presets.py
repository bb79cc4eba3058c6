"""Named BERT shapes with random weights, asked for as `model.name_or_path=preset:NAME` (the bare `tiny` too).

A bare `bert-base-uncased` is the Hugging Face Hub id of Google's pretrained checkpoint, never this preset: random
init happens only when it is asked for (dtrain/model/source.py)."""

from __future__ import annotations

from typing import Any

UNCASED_VOCAB, CASED_VOCAB = 30522, 28996

PRESETS: dict[str, dict[str, Any]] = {
    # tiny: seconds on a CPU, for debug runs and tests; the uncased BERT vocabulary so real tokenizers fit it
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 vocab_size=UNCASED_VOCAB),
    "bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=UNCASED_VOCAB),
    "bert-base-cased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            vocab_size=CASED_VOCAB),
    "bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096, vocab_size=UNCASED_VOCAB),
    "bert-large-cased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                             vocab_size=CASED_VOCAB),
}


def preset_config(name: str, **overrides: Any) -> Any:
    """The transformers BertConfig of a preset (max 512 positions, 2 token types, GELU, as BERT)."""
    from transformers import BertConfig

    return BertConfig(**{**PRESETS[name], "max_position_embeddings": 512, "type_vocab_size": 2, **overrides})
