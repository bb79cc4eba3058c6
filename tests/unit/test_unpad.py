"""The unpadded encoder computes what HF's BertModel computes: outputs and gradients on padded batches, every head."""

import copy

import pytest
import torch
import transformers
from transformers import BertConfig

from dtrain.model.bert import pretraining_losses
from dtrain.model.unpad import UnpaddedBertModel, padded, unpad

VOCAB, BATCH, LENGTH = 120, 5, 24
HEADS = {"classification": ("BertForSequenceClassification", {"num_labels": 3}),
         "multilabel": ("BertForSequenceClassification",
                        {"num_labels": 4, "problem_type": "multi_label_classification"}),
         "regression": ("BertForSequenceClassification", {"num_labels": 1, "problem_type": "regression"}),
         "ner": ("BertForTokenClassification", {"num_labels": 5}),
         "qa": ("BertForQuestionAnswering", {}),
         "prompt": ("BertForMaskedLM", {}),
         "pretraining": ("BertForPreTraining", {})}


def config(dropout=0.0, **extra):
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, attn_implementation="sdpa", **extra)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([LENGTH, 7, 15, 3, 20])  # one full row, the rest padded
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g) * mask
    types = ((torch.arange(LENGTH)[None, :] >= (lengths // 2)[:, None]).long()) * mask
    return ids, mask, types


def targets(kind, mask, g):
    if kind in ("classification",):
        return {"labels": torch.randint(0, 3, (BATCH,), generator=g)}
    if kind == "multilabel":
        return {"labels": torch.randint(0, 2, (BATCH, 4), generator=g).float()}
    if kind == "regression":
        return {"labels": torch.rand(BATCH, generator=g)}
    if kind in ("ner", "prompt"):
        n = 5 if kind == "ner" else VOCAB
        return {"labels": torch.where(mask.bool(), torch.randint(0, n, (BATCH, LENGTH), generator=g), -100)}
    if kind == "qa":
        return {"start_positions": torch.tensor([3, 2, 9, 1, 12]), "end_positions": torch.tensor([5, 6, 11, 2, 19])}
    return {}


def loss_and_outputs(kind, model, ids, mask, types, labels):
    if kind == "pretraining":
        positions = torch.tensor([[1, 2, 5, 0], [1, 3, 0, 0], [4, 8, 14, 0], [1, 0, 0, 0], [2, 9, 19, 0]])
        mlm = torch.where(positions > 0, ids.gather(1, positions), -100)
        b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "mlm_positions": positions,
             "mlm_labels": mlm, "next_sentence_label": torch.tensor([0, 1, 1, 0, 1])}
        losses = pretraining_losses(model, b)
        return losses["mlm"] + losses["nsp"], [losses["mlm"], losses["nsp"]]
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels)
    logits = [out.start_logits, out.end_logits] if kind == "qa" else [out.logits]
    if kind == "qa":  # as dtrain's QA task: padding out of the softmax (HF's own loss includes it)
        logits = [t.masked_fill(~mask.bool(), torch.finfo(t.dtype).min) for t in logits]
        loss = sum(torch.nn.functional.cross_entropy(t, labels[k]) for t, k in
                   zip(logits, ("start_positions", "end_positions"), strict=True))
        return loss, [t[mask.bool()] for t in logits]
    if logits[0].dim() == 3 or kind == "qa":  # per-token outputs: compare the real tokens only
        logits = [t[mask.bool()] for t in logits]
    return out.loss, logits


@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_outputs_and_gradients_equal_hf(kind, padding):
    cls, extra = HEADS[kind]
    torch.manual_seed(0)
    reference = getattr(transformers, cls)(config(**extra))
    model = unpad(copy.deepcopy(reference))
    assert type(model.bert) is UnpaddedBertModel and type(reference.bert) is transformers.BertModel
    assert model.state_dict().keys() == reference.state_dict().keys()
    ids, mask, types = batch()
    mask = mask if padding else torch.ones_like(mask)  # no padding: the gathers skipped, attention unmasked
    labels = targets(kind, mask, torch.Generator().manual_seed(1))
    results = []
    for m in (reference, model):
        m.train()  # dropout is 0: train mode, so every training-only branch runs
        m.zero_grad()
        loss, outputs = loss_and_outputs(kind, m, ids, mask, types, labels)
        loss.backward()
        results.append((loss.detach(), [o.detach() for o in outputs],
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (loss_ref, out_ref, grad_ref), (loss_new, out_new, grad_new) = results
    torch.testing.assert_close(loss_new, loss_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(out_new, out_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grad_new.keys() == grad_ref.keys() and len(grad_ref) > 10
    for name in grad_ref:
        torch.testing.assert_close(grad_new[name], grad_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_eval_mode_with_dropout_configured_and_the_padded_fallbacks():
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(config(dropout=0.1, num_labels=2)).eval()
    model = unpad(copy.deepcopy(reference))
    ids, mask, types = batch(3)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, want,
                                   atol=1e-5, rtol=1e-5)
        # no padding (unpadded path, nothing to drop), inputs_embeds (soft prompts), hidden states (HF's path)
        full = torch.ones_like(mask)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=full).logits,
                                   reference(input_ids=ids, attention_mask=full).logits)
        embeds = reference.bert.embeddings.word_embeddings(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits,
                                   reference(inputs_embeds=embeds, attention_mask=mask).logits)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hidden) == 3


def test_dropout_on_trains_and_differs_between_draws():
    torch.manual_seed(0)
    model = unpad(transformers.BertForSequenceClassification(config(dropout=0.1, num_labels=2))).train()
    ids, mask, types = batch()
    one = model(input_ids=ids, attention_mask=mask).logits
    two = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(one, two)  # dropout is applied on the unpadded path


def test_unpad_keeps_adapters_and_the_export_class():
    from dtrain.model.adapters import add_adapters

    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(config(num_labels=2)).eval()
    add_adapters(reference, {"variant": "houlsby", "reduction_factor": 4, "non_linearity": "relu",
                             "train_layer_norm": True})
    for p in reference.parameters():  # adapters start as the identity: make them do something
        p.data.add_(0.01 * torch.randn_like(p))
    model = unpad(copy.deepcopy(reference))
    ids, mask, types = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert type(padded(model).bert) is transformers.BertModel
    bare = transformers.BertModel(config())
    assert type(unpad(bare)) is transformers.BertModel  # the top module keeps its class (config.json architectures)


def test_set_encoder_applies_unpad_and_gradient_checkpointing():
    from dtrain.model.bert import set_encoder

    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(config(num_labels=2)).train()
    model = set_encoder(copy.deepcopy(reference), unpad=True)
    assert type(model.bert) is UnpaddedBertModel
    assert type(set_encoder(model, unpad=False).bert) is transformers.BertModel
    checkpointed = set_encoder(copy.deepcopy(reference), unpad=True, gradient_checkpointing=True)
    assert checkpointed.bert.gradient_checkpointing  # model.gradient_checkpointing is applied (HF's padded path)
    ids, mask, types = batch(7)
    for m in (reference, checkpointed):
        m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0, 1])).loss.backward()
    for (name, a), b in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize("hidden, attention", [(0.1, 0.0), (0.0, 0.3)])
def test_with_dropout_on_outputs_are_distributed_as_hf_s(hidden, attention):
    """Dropout draws differ between the paths, their distribution does not: over many draws each output's mean and
    spread match HF's (one dropout kind at a time, so a missing or rescaled dropout anywhere shows in the spread)."""
    torch.manual_seed(0)
    cfg = config(num_labels=5)
    cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob = hidden, attention
    cfg.initializer_range = 0.3  # peaked attention, so that attention dropout moves the outputs
    reference = transformers.BertForTokenClassification(cfg).train()
    model = unpad(copy.deepcopy(reference)).train()
    ids, mask, types = batch()

    def spread(m, seed, draws=300):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = torch.stack([m(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[mask.bool()]
                               for _ in range(draws)])
        return out.mean(0), out.std(0).mean()

    (mean_a, std_a), (mean_b, std_b), (mean, std) = spread(reference, 1), spread(reference, 2), spread(model, 3)
    assert std_a > 0.005  # the dropout under test does move the outputs
    assert abs(std / std_a - 1) < 0.05 and abs(std_b / std_a - 1) < 0.05
    noise = (mean_a - mean_b).abs().mean()
    assert (mean - mean_a).abs().mean() < 2 * noise


def test_lora_wrapped_model_unpads_and_merges_to_plain_hf():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config(num_labels=2)).eval()
    reference = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    model = unpad(copy.deepcopy(reference))
    assert type(model.base_model.model.bert) is UnpaddedBertModel
    ids, mask, types = batch(9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    merged = padded(model.merge_and_unload())
    assert type(merged.bert) is transformers.BertModel and type(merged).__name__ == "BertForSequenceClassification"
