"""PEFT on tiny BERT task models: freezing, BitFit, LoRA (and its merge for export), prompt tuning, errors."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from dtrain.errors import DtrainError
from dtrain.model.bert import count_parameters
from dtrain.model.peft import base_hf_model, is_peft, trainable_summary
from dtrain.model.presets import preset_config
from dtrain.optim import build_optimizer
from dtrain.tasks import apply_peft

CLASSES = {"classification": BertForSequenceClassification, "ner": BertForTokenClassification,
           "qa": BertForQuestionAnswering}
OPTIM = types.SimpleNamespace(name="adamw", lr=1e-2, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-6,
                              layerwise_lr_decay=1.0)


def peft_cfg(**overrides):
    fields = dict(method="none", freeze_embeddings=False, freeze_layers=0, train_head_only=False, lora_r=4,
                  lora_alpha=8.0, lora_dropout=0.1, lora_target_modules=["query", "value"], num_virtual_tokens=4)
    return types.SimpleNamespace(**{**fields, **overrides})


def tiny(task="classification", seed=0):
    torch.manual_seed(seed)
    labels = {"num_labels": 2} if task == "qa" else {"num_labels": 3}
    return CLASSES[task](preset_config("tiny", **labels))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types_ = torch.zeros_like(ids)
    types_[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types_}


def loss_of(out, task):
    if task == "qa":
        return F.cross_entropy(out.start_logits, torch.tensor([1, 2, 3, 4])) + \
            F.cross_entropy(out.end_logits, torch.tensor([2, 3, 4, 5]))
    if task == "ner":
        return F.cross_entropy(out.logits.reshape(-1, 3), torch.arange(36) % 3)
    return F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 1]))


def train(model, task, steps=3):
    """A few AdamW steps through dtrain's optimizer (which skips requires_grad=False parameters)."""
    model.train()
    opt = build_optimizer(model, OPTIM)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model(**batch(step)), task).backward()
        opt.step()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changes(model, before):
    """name → whether the parameter differs (at all) from the snapshot."""
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------------
# (a) freezing
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,option,frozen", [
    ("classification", {"freeze_embeddings": True}, lambda n: n.startswith("bert.embeddings.")),
    ("ner", {"freeze_layers": 1}, lambda n: n.startswith("bert.encoder.layer.0.")),
    ("classification", {"freeze_embeddings": True, "freeze_layers": 2},
     lambda n: n.startswith(("bert.embeddings.", "bert.encoder."))),
    ("classification", {"train_head_only": True}, lambda n: not n.startswith("classifier.")),
    ("qa", {"train_head_only": True}, lambda n: not n.startswith("qa_outputs.")),
])
def test_frozen_parts_stay_bit_identical_and_the_rest_trains(task, option, frozen):
    model = apply_peft(tiny(task), peft_cfg(**option), task)
    assert not is_peft(model)
    before = snapshot(model)
    train(model, task)
    changed = changes(model, before)
    assert any(frozen(n) for n in changed) and not all(frozen(n) for n in changed)
    for name, did in changed.items():
        assert did != frozen(name), f"{name}: {'changed' if did else 'did not change'}"


# --------------------------------------------------------------------------------------------------------------------
# (b) BitFit
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze_layers", [0, 1])
def test_bitfit_trains_only_biases_and_the_head(freeze_layers):
    model = apply_peft(tiny(), peft_cfg(method="bitfit", freeze_layers=freeze_layers), "classification")
    before = snapshot(model)
    train(model, "classification")
    for name, did in changes(model, before).items():
        trains = (name.endswith(".bias") and not name.startswith("bert.encoder.layer.0." if freeze_layers else "-")
                  or name.startswith("classifier."))
        assert did == trains, f"{name}: {'changed' if did else 'did not change'}"


def test_trainable_summary_counts_bitfit_parameters():
    model = apply_peft(tiny(), peft_cfg(method="bitfit"), "classification")
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for n, p in params.items() if n.endswith(".bias") or n.startswith("classifier."))
    total = sum(p.numel() for p in params.values())
    # by hand for the tiny preset (hidden 64, 2 layers, FFN 256, 3 labels): embeddings LayerNorm 64; per layer
    # q/k/v/out 4·64 + 2 LayerNorms 2·64 + FFN 256 + 64 = 704; pooler 64; classifier 64·3 + 3 = 195
    assert trainable == 64 + 2 * 704 + 64 + 195 == 1731
    assert total == 2_090_755
    assert trainable_summary(model) == f"trainable parameters: 1,731 of 2,090,755 ({100 * 1731 / 2_090_755:.2f}%)"
    assert trainable_summary(model) == "trainable parameters: 1,731 of 2,090,755 (0.08%)"


def test_trainable_summary_counts_tied_weights_once():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(preset_config("tiny"))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    total = count_parameters(model)
    assert trainable_summary(model) == f"trainable parameters: {total:,} of {total:,} (100.00%)"


# --------------------------------------------------------------------------------------------------------------------
# (c) LoRA
# --------------------------------------------------------------------------------------------------------------------


def is_lora(name):
    return ".lora_A." in name or ".lora_B." in name


@pytest.mark.parametrize("task", ["classification", "ner", "qa"])
def test_lora_trains_only_adapters_and_head(task):
    model = apply_peft(tiny(task), peft_cfg(method="lora"), task)
    assert is_peft(model)
    head = "qa_outputs" if task == "qa" else "classifier"
    before = snapshot(model)
    train(model, task)
    changed = changes(model, before)
    assert sum(is_lora(n) for n in changed) == 2 * 2 * 2  # A and B of query and value in 2 layers
    for name, did in changed.items():
        trains = is_lora(name) or f".{head}.modules_to_save." in name
        assert did == trains, f"{name}: {'changed' if did else 'did not change'}"
    out = model(**batch())
    assert (out.start_logits if task == "qa" else out.logits).shape[0] == 4


def test_lora_skips_frozen_layers():
    model = apply_peft(tiny(), peft_cfg(method="lora", freeze_layers=1, lora_target_modules=["query", "dense"]),
                       "classification")
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if is_lora(n)}
    assert adapted and not any(".layer.0." in n for n in adapted)
    assert "base_model.model.bert.encoder.layer.1.attention.self.query" in adapted
    assert "base_model.model.bert.pooler.dense" in adapted


def no_peft_modules(model):
    return not any(type(m).__module__.startswith("peft") for m in model.modules())


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_lora_merge_gives_a_plain_model_with_equal_logits(task):
    model = apply_peft(tiny(task), peft_cfg(method="lora"), task)
    train(model, task)
    model.eval()
    with torch.no_grad():
        expected = model(**batch(7)).logits
    merged = base_hf_model(model).eval()
    assert type(merged) is CLASSES[task] and no_peft_modules(merged) and not is_peft(merged)
    assert not any("lora" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch(7)).logits, expected, atol=1e-5, rtol=0)
        # the merge happened on a copy: the PEFT model still has its adapters and the same outputs
        assert any(is_lora(n) for n, _ in model.named_parameters())
        assert torch.equal(model(**batch(7)).logits, expected)
    assert not torch.allclose(tiny(task).eval()(**batch(7)).logits, expected)  # training did move the outputs


def test_lora_export_from_a_state_dict_loads_with_auto_model(tmp_path):
    trained = apply_peft(tiny(), peft_cfg(method="lora"), "classification")
    train(trained, "classification")
    trained.eval()
    with torch.no_grad():
        expected = trained(**batch(5)).logits
    fresh = apply_peft(tiny(), peft_cfg(method="lora"), "classification")
    fresh_before = snapshot(fresh)
    export = base_hf_model(fresh, trained.state_dict())
    assert not any(changes(fresh, fresh_before).values()) and is_peft(fresh)  # the template is untouched
    export.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(reloaded) is BertForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(5)).logits, expected, atol=1e-5, rtol=0)


def test_a_state_dict_of_another_method_is_a_one_line_error():
    trained = apply_peft(tiny(), peft_cfg(method="lora"), "classification")
    with pytest.raises(DtrainError, match=r"^the state dict does not fit the model .*same peft\.method\)$"):
        base_hf_model(tiny(), trained.state_dict())


def test_none_and_bitfit_export_the_model_itself_or_a_loaded_copy():
    model = apply_peft(tiny(), peft_cfg(method="bitfit"), "classification")
    assert base_hf_model(model) is model
    other = tiny(seed=3).state_dict()
    copy_ = base_hf_model(model, other)
    assert copy_ is not model and torch.equal(copy_.classifier.weight, other["classifier.weight"])
    assert not torch.equal(model.classifier.weight, other["classifier.weight"])


# --------------------------------------------------------------------------------------------------------------------
# (d) prompt tuning
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_tuning_trains_only_the_prompt_and_head():
    model = apply_peft(tiny(), peft_cfg(method="prompt_tuning"), "classification")
    assert is_peft(model)
    before = snapshot(model)
    train(model, "classification")
    for name, did in changes(model, before).items():
        trains = name.startswith("prompt_encoder.") or ".classifier.modules_to_save." in name
        assert did == trains, f"{name}: {'changed' if did else 'did not change'}"


def test_prompt_tuning_pads_token_type_ids_for_the_virtual_tokens():
    base = tiny()
    model = apply_peft(copy.deepcopy(base), peft_cfg(method="prompt_tuning", num_virtual_tokens=4),
                       "classification").eval()
    b = batch()
    with torch.no_grad():
        got = model(**b).logits
        # by hand: prompt embeddings before the word embeddings, their attention 1 and token type 0
        prompts = model.prompt_encoder.default.embedding.weight.unsqueeze(0).expand(4, -1, -1)
        embeds = torch.cat([prompts, base.bert.embeddings.word_embeddings(b["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(4, 4, dtype=torch.long), b["attention_mask"]], dim=1)
        types_ = torch.cat([torch.zeros(4, 4, dtype=torch.long), b["token_type_ids"]], dim=1)
        head = model.base_model.classifier.modules_to_save.default
        pooled = base.eval().bert(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types_).pooler_output
        torch.testing.assert_close(got, head(pooled), atol=1e-5, rtol=0)
        # the token types do reach the encoder
        assert not torch.allclose(got, model(**{**b, "token_type_ids": torch.zeros_like(b["token_type_ids"])}).logits)


def test_prompt_tuning_export_is_a_loadable_peft_adapter(tmp_path):
    from peft import PeftModel

    base = tiny()
    model = apply_peft(copy.deepcopy(base), peft_cfg(method="prompt_tuning"), "classification")
    train(model, "classification")
    model.eval()
    with torch.no_grad():
        expected = model(**batch(4)).logits
    export = base_hf_model(model)
    assert is_peft(export)
    export.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(4)).logits, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# (e) errors
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_lora_target_names_the_linear_layers():
    with pytest.raises(DtrainError) as e:
        apply_peft(tiny(), peft_cfg(method="lora", lora_target_modules=["query", "qkv"]), "classification")
    assert str(e.value) == ("peft.lora_target_modules: 'qkv' matches no module of the model; BERT's linear layers "
                            "are query, key, value, dense (attention.output.dense, intermediate.dense, output.dense, "
                            "pooler.dense)")
    with pytest.raises(DtrainError, match=r"'classifier' matches no module"):  # the head trains whole, not by LoRA
        apply_peft(tiny(), peft_cfg(method="lora", lora_target_modules=["classifier"]), "classification")


def test_lora_targets_only_in_frozen_layers_is_an_error():
    with pytest.raises(DtrainError, match=r"are all in frozen parts .*lower peft\.freeze_layers"):
        apply_peft(tiny(), peft_cfg(method="lora", freeze_layers=2), "classification")


def test_prompt_tuning_on_ner_is_an_error():
    with pytest.raises(DtrainError) as e:
        apply_peft(tiny("ner"), peft_cfg(method="prompt_tuning"), "ner")
    assert str(e.value) == ("peft.method=prompt_tuning supports sequence-level tasks (classification, pair, "
                            "multilabel, regression), not ner; use lora")


def test_too_many_frozen_layers_is_an_error():
    with pytest.raises(DtrainError, match=r"^peft\.freeze_layers=3 but the model has 2 encoder layers; set "
                                          r"peft\.freeze_layers between 0 and 2$"):
        apply_peft(tiny(), peft_cfg(freeze_layers=3), "classification")
    apply_peft(tiny(), peft_cfg(freeze_layers=2), "classification")  # all of them is fine


def test_head_only_with_a_method_and_unknown_names_are_errors():
    with pytest.raises(DtrainError, match=r"peft\.train_head_only .* peft\.method=bitfit"):
        apply_peft(tiny(), peft_cfg(method="bitfit", train_head_only=True), "classification")
    with pytest.raises(DtrainError, match=r"peft\.method 'adapters' is unknown"):
        apply_peft(tiny(), peft_cfg(method="adapters"), "classification")
    with pytest.raises(DtrainError, match=r"task\.type 'summarise' has no PEFT support"):
        apply_peft(tiny(), peft_cfg(), "summarise")
