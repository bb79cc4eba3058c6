"""Cloze prompts (dtrain/tasks/prompt.py): the template around the text, the mask position, label scores read from
the verbalizer words at the mask, and a one-line error for every template or verbalizer that cannot work."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dtrain.errors import DtrainError
from dtrain.tasks import FinetuneCollator, get_task
from dtrain.tasks.prompt import PromptError, build_prompt, read_prompt_file
from tests.conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def opts(template="{text} it was [MASK].", verbalizer=None):
    return SimpleNamespace(template=template, verbalizer=verbalizer or {"pos": ["new", "more"], "neg": ["first"]})


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_the_template_goes_around_the_text_with_one_mask(tok):
    prompt = build_prompt(opts(), tok, ["neg", "pos"], pairs=False, max_seq_len=32)
    text = ids(tok, "the market had growth")
    encoded, position = prompt.encode(text, None)
    assert tok.convert_ids_to_tokens(encoded) == ["[CLS]", *tok.convert_ids_to_tokens(text), "it", "was", "[MASK]",
                                                  ".", "[SEP]"]
    assert encoded[position] == tok.mask_token_id and encoded.count(tok.mask_token_id) == 1
    assert prompt.word_ids == ((tok.convert_tokens_to_ids("first"),),
                               (tok.convert_tokens_to_ids("new"), tok.convert_tokens_to_ids("more")))


def test_pairs_are_cut_longest_first_to_the_length_limit(tok):
    prompt = build_prompt(opts("{text} ? [MASK], {text_pair}"), tok, ["neg", "pos"], pairs=True, max_seq_len=12)
    a, b = ids(tok, "the a of to and in is was"), ids(tok, "for on that")
    encoded, position = prompt.encode(a, b)
    assert len(encoded) == 12  # [CLS] ? [MASK] , [SEP] leave 7 for the texts: a keeps 4, b keeps 3
    assert tok.convert_ids_to_tokens(encoded) == ["[CLS]", "the", "a", "of", "to", "?", "[MASK]", ",", "for", "on",
                                                  "that", "[SEP]"]
    assert position == 6


def test_the_collator_puts_the_template_around_a_shard_row(tok):
    task = get_task("prompt").bind(opts(), tok, ["neg", "pos"], False, 32)
    row = tok("the market had growth", truncation=True, max_length=32, return_token_type_ids=True)
    sample = {"input_ids": row["input_ids"], "token_type_ids": row["token_type_ids"], "label": 1, "index": 7,
              "pad": False}
    batch = FinetuneCollator(task, tok.pad_token_id, 2, pad_to_multiple_of=1)([sample])
    want, position = task.prompt.encode(row["input_ids"][1:-1], None)
    assert batch["input_ids"][0].tolist() == want and batch["mask_position"].tolist() == [position]
    assert batch["labels"].tolist() == [1] and batch["token_type_ids"].sum() == 0


def test_label_scores_are_the_verbalizer_words_log_probabilities_at_the_mask(tok):
    """The scores equal the full MLM model's log-softmax at the mask position, averaged over each label's words —
    and no other position or word moves them."""
    from transformers import BertForMaskedLM

    from dtrain.model.presets import preset_config

    torch.manual_seed(0)
    model = BertForMaskedLM(preset_config("tiny", vocab_size=tok.vocab_size)).eval()
    task = get_task("prompt").bind(opts(), tok, ["neg", "pos"], False, 32)
    rows = [tok(t, return_token_type_ids=True) for t in ("the market had growth", "police on the court was new")]
    samples = [{"input_ids": r["input_ids"], "token_type_ids": r["token_type_ids"], "label": i, "index": i,
                "pad": False} for i, r in enumerate(rows)]
    batch = {k: torch.as_tensor(v) for k, v in FinetuneCollator(task, tok.pad_token_id, 2)(samples).items()}
    with torch.no_grad():
        scores = task.forward(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits.log_softmax(-1)
    for b in range(2):
        at = full[b, int(batch["mask_position"][b])]
        assert batch["input_ids"][b, batch["mask_position"][b]] == tok.mask_token_id
        expected = [at[list(words)].mean() for words in task.prompt.word_ids]
        assert torch.allclose(scores[b], torch.stack(expected), atol=1e-5)
    # the loss is cross-entropy over the label scores
    terms = task.loss_terms(scores, batch, SimpleNamespace(weights=None, label_smoothing=0.0))
    assert torch.allclose(terms["cls"], torch.nn.functional.cross_entropy(scores, batch["labels"], reduction="sum"))


@pytest.mark.parametrize(("template", "verbalizer", "pairs", "message"), [
    ("{text} it was.", None, False, "has no [MASK]: the label is read at one mask"),
    ("{text} [MASK] or [MASK].", None, False, "has 2 [MASK]s"),
    ("It was [MASK].", None, False, "has no {text} slot"),
    ("{text} {label} [MASK]", None, False, "unknown slot {label}; the slots are {text} and {text_pair}"),
    ("{text} [MASK] {text_pair}", None, False, "has {text_pair}, but data.train has no text pairs"),
    ("{text} [MASK].", None, True, "has no {text_pair}, but data.train has text pairs"),
    ("", None, False, "task.template is not set"),
    ("{text} [MASK].", {"pos": ["new"]}, False, "task.verbalizer has no word for label 'neg'"),
    ("{text} [MASK].", {"pos": ["new"], "neg": ["first"], "meh": ["two"]}, False, "maps 'meh', which is not a label"),
    ("{text} [MASK].", {"pos": ["growing"], "neg": ["first"]}, False,
     "'growing' (label 'pos') is 5 word pieces for this tokenizer (g, ##r, ##o, ##w, ##ing)"),
    ("{text} [MASK].", {"pos": ["new"], "neg": ["new"]}, False, "'new' is a word of both 'neg' and 'pos'"),
    ("{text} [MASK].", {"pos": ["new"], "neg": []}, False, "label 'neg' has no words"),
])
def test_templates_and_verbalizers_that_cannot_work_are_one_line(tok, template, verbalizer, pairs, message):
    with pytest.raises(PromptError) as e:
        build_prompt(opts(template, verbalizer), tok, ["neg", "pos"], pairs, 32)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_word_outside_the_vocabulary_and_a_template_longer_than_the_limit_are_refused(tok):
    with pytest.raises(PromptError, match=r"'\$' \(label 'pos'\) is not in the tokenizer's vocabulary"):
        build_prompt(opts(verbalizer={"pos": ["$"], "neg": ["first"]}), tok, ["neg", "pos"], False, 32)
    with pytest.raises(PromptError, match="leaves no room for the text; shorten it or raise data.max_seq_len"):
        build_prompt(opts("{text} it was the a of to [MASK]."), tok, ["neg", "pos"], False, 10)


def test_prompt_settings_on_another_task_are_refused(tok):
    with pytest.raises(DtrainError, match=r"task.template is set, but task classification does not use it .* set "
                                          r"task.type=prompt"):
        get_task("classification").bind(opts(), tok, ["neg", "pos"], False, 32)


def test_a_checkpoint_without_an_mlm_head_is_refused_with_the_fix():
    task = get_task("prompt")
    with pytest.raises(DtrainError, match=r"m/ has no trained MLM head .* continue pretraining it first"):
        task.check_loaded("m/", ["cls.predictions.transform.dense.weight", "cls.predictions.bias"], preset=False)
    task.check_loaded("preset:tiny", ["cls.predictions.transform.dense.weight"], preset=True)  # random init: asked
    task.check_loaded("m/", [], preset=False)


def test_prompt_files_and_the_task_pickle_with_their_prompt(tok, tmp_path):
    import pickle

    good = tmp_path / "p.yaml"
    good.write_text('template: "{text} it was [MASK]."\nverbalizer: {pos: [new], neg: first}\n')
    options = read_prompt_file(good)
    task = get_task("prompt").bind(options, tok, ["neg", "pos"], False, 32)
    assert pickle.loads(pickle.dumps(task)).prompt == task.prompt
    config = tmp_path / "finetune.yaml"  # a fine-tuning config with a prompt works as a prompt file too
    config.write_text('task:\n  type: prompt\n  template: "{text} [MASK]."\n  verbalizer: {pos: [new], neg: [first]}\n')
    assert read_prompt_file(config).template == "{text} [MASK]."
    bad = tmp_path / "bad.yaml"
    bad.write_text("template: '{text} [MASK]'\n")
    with pytest.raises(PromptError, match=r"--prompt .*bad.yaml: needs the keys template and verbalizer"):
        read_prompt_file(bad)
    with pytest.raises(PromptError, match="no such file"):
        read_prompt_file(tmp_path / "missing.yaml")


def test_the_auxiliary_mlm_loss_masks_only_text_tokens_on_the_training_side(tok):
    """task.prompt_lm_weight > 0: the training side's batches carry a copy with ~15% of the text tokens selected
    (never [CLS], [SEP], the template or its mask), labelled with their original ids, the same on every call; the
    evaluation side has none; the loss gains an `lm` term (weighted) with its own target count."""
    from transformers import BertForMaskedLM

    from dtrain.data import IGNORE
    from dtrain.model.presets import preset_config
    from dtrain.tasks import Head

    options = SimpleNamespace(**vars(opts()), prompt_lm_weight=0.5)
    task = get_task("prompt").bind(options, tok, ["neg", "pos"], False, 64)
    trains = task.for_training()
    assert trains is not task and task.for_training() is not task and not task.lm and trains.lm
    assert get_task("prompt").bind(opts(), tok, ["neg", "pos"], False, 64).for_training().lm is False  # weight 0
    text = " ".join(["the market had growth and the bank rate was new"] * 3)
    rows = [tok(text, return_token_type_ids=True) for _ in range(8)]
    samples = [{"input_ids": r["input_ids"], "token_type_ids": r["token_type_ids"], "label": i % 2, "index": i,
                "epoch": 0, "pad": False} for i, r in enumerate(rows)]
    collate = FinetuneCollator(trains, tok.pad_token_id, 2)
    batch = collate(samples)
    assert (batch["lm_labels"] == collate(samples)["lm_labels"]).all()  # deterministic
    assert "lm_labels" not in FinetuneCollator(task, tok.pad_token_id, 2)(samples)
    _, position, text_positions = task.prompt.encode_spans(rows[0]["input_ids"][1:-1], None)
    chosen = batch["lm_labels"] != IGNORE
    assert set(np.nonzero(chosen)[1].tolist()) <= set(text_positions) and position not in np.nonzero(chosen)[1]
    assert 0.05 < chosen.sum() / (len(text_positions) * len(samples)) < 0.3
    assert (batch["lm_labels"][chosen] == batch["input_ids"][chosen]).all()  # labels: the original ids
    assert (batch["lm_input_ids"][chosen] == tok.mask_token_id).mean() > 0.5
    assert (batch["lm_input_ids"][~chosen] == batch["input_ids"][~chosen]).all()
    next_epoch = collate([{**s, "epoch": 1} for s in samples])["lm_labels"]
    assert (next_epoch != batch["lm_labels"]).any()  # dynamic: another epoch masks others

    torch.manual_seed(0)
    model = BertForMaskedLM(preset_config("tiny", vocab_size=tok.vocab_size)).eval()
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    head = Head(trains)
    terms, counts = head.losses(model, tensors), head.counts(tensors)
    assert set(terms) == {"cls", "lm"} and int(counts["lm"]) == int(chosen.sum())
    hidden = model.bert(input_ids=tensors["lm_input_ids"], attention_mask=tensors["attention_mask"])[0]
    logits = model.cls.predictions(hidden[torch.as_tensor(chosen)])
    expected = torch.nn.functional.cross_entropy(logits, tensors["lm_labels"][torch.as_tensor(chosen)],
                                                 reduction="sum")
    assert torch.allclose(terms["lm"], 0.5 * expected, rtol=1e-5)


def test_bad_prompt_files_and_a_plain_mlm_without_a_prompt_are_one_line(tok, tmp_path):
    from transformers import BertForMaskedLM

    from dtrain.model.presets import preset_config
    from dtrain.predict import load_finetuned

    for text, shown in (("template: 5\nverbalizer: {pos: new}\n", "template must be text"),
                        ("template: '{text} [MASK]'\nverbalizer: {pos: 1}\n", "verbalizer must map each label")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(PromptError, match=shown):
            read_prompt_file(bad)
    plain = tmp_path / "mlm"
    BertForMaskedLM(preset_config("tiny", vocab_size=tok.vocab_size)).save_pretrained(str(plain))
    tok.save_pretrained(str(plain))
    with pytest.raises(DtrainError, match=r"a BertForMaskedLM without dtrain's saved task settings .* pass --prompt"):
        load_finetuned(plain)
