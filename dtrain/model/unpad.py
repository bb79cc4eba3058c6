"""Unpadded BERT encoder (`model.unpad`): the dense layers compute on the batch's real tokens only.

A padded micro-batch [B, L] holds B·L positions of which only the attention mask's ones are text; HF's BertModel runs
every projection, feed-forward and LayerNorm on all of them. Here the real tokens are gathered into one [T, hidden]
tensor after the embedding lookup (as MosaicBERT and ModernBERT do), so embeddings' LayerNorm, Q/K/V, the attention
output projection, the feed-forward and every LayerNorm and dropout see T rows, and the tensor is re-padded only
around attention (SDPA with the padding mask over [B, heads, L, d]). The sequence output comes back padded [B, L, H]
(zeros at padding), so every task head, the masked-only MLM head and the pooler run unchanged.

Written here because transformers' BertModel has no unpadded path (its SDPA/flash integrations take padded
tensors), and neither MosaicBERT's nor ModernBERT's code fits: they are other module trees with other parameter
names. This class is a subclass of BertModel swapped onto the model's `bert` module: parameter names, shapes and
state dicts stay HF BERT's, so checkpoints, `model.init_from`, DeepSpeed's partitioning (its hooks sit on the
Linear/LayerNorm/Embedding modules this forward calls) and `dtrain export` are unchanged, and sub-layers swapped by
bottleneck adapters or wrapped by LoRA are called as they are.

The padded path is taken where this one does not apply: inputs_embeds (soft prompts), explicit position ids,
attention outputs or hidden states asked for, a decoder config, gradient checkpointing, or attn_implementation other
than sdpa. A batch without padding takes this path too, with the gathers and scatters skipped and attention
unmasked (eager only; it is then HF's arithmetic). The modules called and their order never depend on the data, so
all ranks call the same modules in the same order, as ZeRO-3 needs. Reading the token count (`nonzero`) is one host
sync per forward on a GPU and a graph break under model.compile (the regions either side compile with dynamic
shapes). Dropout draws differ from the padded path's (other shapes), so outputs are equal to HF's with dropout off
(tests/unit/test_unpad.py) and distributed alike with it on (each output's mean and spread over many draws,
tested).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

_PADDED_ONLY = ("inputs_embeds", "position_ids", "encoder_hidden_states", "encoder_attention_mask", "cache",
                "past_key_values")


class UnpaddedBertModel(BertModel):
    """BertModel whose forward runs the encoder on the real tokens of a padded batch (see the module docstring)."""

    def _takes_unpadded(self, input_ids: Any, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
        if input_ids is None or attention_mask is None or attention_mask.dim() != 2:
            return False
        if any(kwargs.get(k) is not None for k in _PADDED_ONLY) or kwargs.get("use_cache"):
            return False
        if any(kwargs.get(k, getattr(self.config, k, False)) for k in ("output_attentions", "output_hidden_states")):
            return False
        return not (self.config.is_decoder or self.gradient_checkpointing or self.config._attn_implementation != "sdpa")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if not self._takes_unpadded(input_ids, attention_mask, kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   **kwargs)
        batch, length = input_ids.shape
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] positions of the real tokens in B·L
        # No padding: the gathers and scatters are the identity and attention needs no mask. Not under model.compile,
        # where the test would guard the graph on the token count and compile it twice.
        full = not torch.compiler.is_compiling() and len(real) == batch * length
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        def gather(t: torch.Tensor) -> torch.Tensor:  # [B, L] → [T]
            return t.reshape(-1) if full else t.reshape(-1)[real]

        def repad(t: torch.Tensor) -> torch.Tensor:  # [T, n] → [B, L, n] with zeros at padding
            if full:
                return t.view(batch, length, -1)
            return t.new_zeros(batch * length, t.shape[-1]).index_copy(0, real, t).view(batch, length, -1)

        positions = gather(torch.arange(length, device=input_ids.device).expand(batch, length))
        emb = self.embeddings
        x = emb.word_embeddings(gather(input_ids)) + emb.token_type_embeddings(gather(token_type_ids))
        x = emb.dropout(emb.LayerNorm(x + emb.position_embeddings(positions)))
        keys = None if full else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: the keys a query may see

        for layer in self.encoder.layer:
            attention = layer.attention.self
            q, k, v = (repad(proj(x)).unflatten(-1, (-1, attention.attention_head_size)).transpose(1, 2)
                       for proj in (attention.query, attention.key, attention.value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attention.scaling,
                                                 dropout_p=attention.dropout.p if self.training else 0.0)
            out = out.transpose(1, 2).reshape(batch * length, -1)
            out = out if full else out.index_select(0, real)
            x = layer.attention.output(out, x)
            x = layer.output(layer.intermediate(x), x)
        sequence = repad(x)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        if kwargs.get("return_dict") is False:
            return (sequence, pooled)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)


def unpad(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its BERT encoder (a BertModel, or the `bert` of a BertFor* model, inside a peft wrapper too) on
    the unpadded path; anything else is returned as it is. In place; the state dict is unchanged. A bare BertModel
    at the top is left alone (save_pretrained names its class in config.json's architectures)."""
    for module in model.modules():
        if type(module) is BertModel and module is not model:
            module.__class__ = UnpaddedBertModel
            _register_outputs(module)
    return model


def _register_outputs(module: torch.nn.Module) -> None:
    """transformers records hidden states/attentions for the classes it registered (by class name, at init): the
    swapped class gets BertModel's entry, so output_hidden_states=True (padded path) still returns them."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers layout: nothing registered, nothing to do
        return
    _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def padded(model: torch.nn.Module) -> torch.nn.Module:
    """The inverse of `unpad` (in place), e.g. for an export whose class names must be HF's."""
    for module in model.modules():
        if type(module) is UnpaddedBertModel:
            module.__class__ = BertModel
    return model
