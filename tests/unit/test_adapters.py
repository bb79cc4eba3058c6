"""Bottleneck adapters on tiny BERT task models: placement per variant, identity at initialisation, what trains,
the export with its adapters (dtrain.load_model, pipeline()), checkpoint state, and the errors."""

import copy
import pickle
import types

import pytest
import torch
from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

import dtrain
from dtrain.errors import DtrainError
from dtrain.model import adapters
from dtrain.model.presets import preset_config
from dtrain.tasks import apply_peft

CLASSES = {"classification": BertForSequenceClassification, "ner": BertForTokenClassification,
           "qa": BertForQuestionAnswering}


def cfg(**overrides):
    fields = dict(method="adapter", freeze_embeddings=False, freeze_layers=0, train_head_only=False, lora_r=4,
                  lora_alpha=8.0, lora_dropout=0.1, lora_target_modules=["query", "value"], num_virtual_tokens=4,
                  adapter_variant="houlsby", adapter_reduction_factor=8, adapter_non_linearity="relu",
                  adapter_train_layer_norm=True)
    return types.SimpleNamespace(**{**fields, **overrides})


def tiny(task="classification", seed=0):
    torch.manual_seed(seed)
    return CLASSES[task](preset_config("tiny", num_labels=2 if task == "qa" else 3))


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def logits(model):
    model.eval()
    with torch.no_grad():
        out = model(**batch())
    return out.start_logits if hasattr(out, "start_logits") and out.start_logits is not None else out.logits


@pytest.mark.parametrize("variant,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("task", ["classification", "ner", "qa"])
def test_adapters_start_as_the_identity_and_only_they_the_head_and_layernorms_train(task, variant, per_layer):
    base = tiny(task)
    model = apply_peft(copy.deepcopy(base), cfg(adapter_variant=variant), task)
    names = [n for n, _ in model.named_parameters()]
    layers = model.config.num_hidden_layers
    assert sum(n.endswith(".adapter.down.weight") for n in names) == layers * per_layer
    assert (".attention.output.adapter.down.weight" in " ".join(names)) == (variant == "houlsby")
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)  # zero up-projection: exactly the base
    head = "qa_outputs" if task == "qa" else "classifier"
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapter." in name or name.startswith(f"{head}.") or ".LayerNorm." in name), name
    # the HF names of the adapted sub-layers stay where they were (checkpoints, init_from, DeepSpeed see them)
    assert set(base.state_dict()) <= set(model.state_dict())


def test_the_bottleneck_width_and_the_layernorm_option():
    model = apply_peft(tiny(), cfg(adapter_reduction_factor=16, adapter_train_layer_norm=False,
                                   adapter_non_linearity="gelu"), "classification")
    down = model.bert.encoder.layer[0].output.adapter.down
    assert down.out_features == model.config.hidden_size // 16
    assert isinstance(model.bert.encoder.layer[0].output.adapter.act, torch.nn.GELU)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "LayerNorm" in n)


def test_an_adapted_model_trains_its_adapters_and_changes_its_outputs():
    model = apply_peft(tiny(), cfg(), "classification")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = logits(model)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(**batch()).logits, torch.tensor([0, 1, 2, 1]))
        loss.backward()
        optim.step()
        optim.zero_grad()
    assert not torch.allclose(logits(model), before)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert model.bert.encoder.layer[0].output.adapter.up.weight.abs().sum() > 0


def test_the_export_loads_back_with_its_adapters_and_serves_a_pipeline(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, pipeline

    from dtrain.export import _write

    model = apply_peft(tiny(), cfg(), "classification")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter.up." in n:
                p.normal_(std=0.5)  # trained adapters: not the identity
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _write(model, None, tok, tmp_path)
    assert (tmp_path / adapters.ADAPTER_WEIGHTS).is_file() and (tmp_path / adapters.ADAPTER_CONFIG).is_file()
    plain = BertForSequenceClassification.from_pretrained(str(tmp_path))  # the HF model alone: no adapter keys
    assert not any(".adapter." in k for k in plain.state_dict())
    loaded = dtrain.load_model(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model))
    assert not torch.allclose(logits(plain), logits(model))  # the adapters matter, so the loader must bring them
    from dtrain.files import EXPORT, output_kind

    assert output_kind(tmp_path) == EXPORT
    clf = pipeline("text-classification", model=loaded, tokenizer=tok, device=-1)
    ids = tok(["the growth of the market"], return_tensors="pt")
    with torch.no_grad():
        want = loaded(**ids).logits.softmax(-1)[0]
    got = clf("the growth of the market", top_k=None)
    assert {d["label"]: round(d["score"], 5) for d in got} == \
        {loaded.config.id2label[i]: round(float(want[i]), 5) for i in range(3)}


def test_adapted_models_copy_and_pickle(tmp_path):
    import subprocess
    import sys

    model = apply_peft(tiny(), cfg(), "classification")
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(other), logits(model))
        assert type(other.bert.encoder.layer[0].output).__name__ == "AdaptedBertOutput"
    torch.save(model, tmp_path / "model.pt")  # loads in a process that never made an adapted class
    code = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m.bert.encoder.layer[0].attention.output).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt")], capture_output=True, text=True)
    assert out.stdout.strip() == "AdaptedBertSelfOutput", out.stderr[-2000:]


def test_a_damaged_adapter_config_is_one_line(tmp_path):
    model = apply_peft(tiny(), cfg(), "classification")
    adapters.save(model, None, tmp_path)
    (tmp_path / adapters.ADAPTER_CONFIG).write_text('{"variant": "houlsby"}\n')
    with pytest.raises(DtrainError, match=r"its adapters \(dtrain_adapters\.json, dtrain_adapters\.safetensors\) "
                                          r"cannot be read .*; export the run again"):
        adapters.load(tiny(), tmp_path)


def test_bad_adapter_settings_and_models_are_refused():
    with pytest.raises(DtrainError, match=r"peft\.adapter_variant=both: choose one of houlsby, pfeiffer"):
        apply_peft(tiny(), cfg(adapter_variant="both"), "classification")
    with pytest.raises(DtrainError, match=r"peft\.adapter_non_linearity=sine: choose one of relu, gelu, swish"):
        apply_peft(tiny(), cfg(adapter_non_linearity="sine"), "classification")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    other = DistilBertForSequenceClassification(DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2))
    with pytest.raises(DtrainError, match=r"peft\.method=adapter needs a BERT model \(BertFor\*\), not distilbert"):
        adapters.add_adapters(other, adapters.settings(cfg()))
