"""Replay mixes (exactly once, deterministic, resumable), the teacher's loss, and students built from a teacher's
layers."""

import json
import shutil

import numpy as np
import pytest
import torch

from dtrain.data.mix import MixedDataset, replay_sample
from dtrain.data.shards import ShardedDataset
from dtrain.data.stream import StreamingDataset, StreamLoader
from dtrain.errors import DtrainError
from dtrain.methods import replay
from dtrain.methods.distill import Teacher, student_from_layers
from dtrain.tasks import Head, get_task
from tests.integration.test_training import write_sentiment


@pytest.fixture(scope="module")
def two_sets(tokenizer_dir, tmp_path_factory):
    new = write_sentiment(tmp_path_factory.mktemp("new"), tokenizer_dir)
    old = write_sentiment(tmp_path_factory.mktemp("old"), tokenizer_dir)
    return ShardedDataset(new["train"]), ShardedDataset(old["dev"]), ShardedDataset(old["test"])


def test_replay_sample_is_seeded_without_repeats_until_it_must():
    a, b = replay_sample(100, 30, seed=7), replay_sample(100, 30, seed=7)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 30
    assert not np.array_equal(a, replay_sample(100, 30, seed=8))
    many = replay_sample(10, 25, seed=1)
    assert sorted(np.bincount(many, minlength=10).tolist()) == [2] * 5 + [3] * 5  # each row twice, 5 three times


def test_a_mix_is_the_new_rows_then_the_replayed_ones(two_sets):
    new, old1, old2 = two_sets
    mix = MixedDataset(new, [old1, old2], 30, seed=3)
    assert len(mix) == len(new) + 30
    assert mix[5]["input_ids"].tolist() == new[5]["input_ids"].tolist()
    starts = [0, len(old1), len(old1) + len(old2)]
    for i, g in enumerate(mix.picked.tolist()):
        data, row = (old1, g) if g < starts[1] else (old2, g - starts[1])
        assert mix[len(new) + i]["input_ids"].tolist() == data[row]["input_ids"].tolist()
    assert mix.column("length").tolist() == new.column("length").tolist() + [
        int(np.concatenate([old1.column("length"), old2.column("length")])[g]) for g in mix.picked]
    assert sum(s["rows"] for s in mix.shards) == len(mix)
    record = mix.record()
    assert record["path"] == str(new.path.resolve()) and record["replayed_rows"] == 30
    assert [r["path"] for r in record["replayed"]] == [str(old1.path.resolve()), str(old2.path.resolve())]


class _Counted:
    """A prepared set as replay_count sees it: its rows, and its documents when windowed."""

    def __init__(self, rows: int, documents: int | None = None):
        self.rows, self.manifest = rows, {"rows": rows, **({"documents": documents} if documents else {})}

    def __len__(self) -> int:
        return self.rows


def test_replay_draws_old_documents_per_new_document_windowed_or_not():
    assert replay.replay_count(0.5, _Counted(100), [_Counted(300)]) == 50  # plain sets: rows are documents
    # new: 100 documents in 400 windows; old: 200 documents in 600 windows (3 windows each, each weighing 1/3):
    # 50 old documents' weight takes 150 old windows
    assert replay.replay_count(0.5, _Counted(400, 100), [_Counted(600, 200)]) == 150
    assert replay.replay_count(0.5, _Counted(400, 100), [_Counted(600, 200), _Counted(200)]) == 100  # 800 / 400
    assert replay.replay_count(0.001, _Counted(10), [_Counted(10)]) == 1  # at least one row


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_epoch_streams_each_mixed_row_exactly_once_at_any_world_size(two_sets, world):
    new, old1, _ = two_sets
    mix = MixedDataset(new, [old1], 40, seed=3)
    seen = []
    for rank in range(world):
        stream = StreamingDataset(mix, batch_size=4, seed=11, drop_last=False, rank=rank, world_size=world)
        seen += [s["index"] for s in stream if not s["pad"]]
    assert sorted(seen) == list(range(len(mix)))


def test_a_resumed_mix_stream_continues_where_it_stopped(two_sets):
    new, old1, _ = two_sets
    mix = MixedDataset(new, [old1], 40, seed=3)

    def loader():
        return StreamLoader(StreamingDataset(mix, batch_size=4, seed=11, rank=0, world_size=1),
                            lambda samples: [s["index"] for s in samples])

    straight = [i for batch in loader() for i in batch]
    first = loader()
    it = iter(first)
    head = [i for _ in range(5) for i in next(it)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert head + [i for batch in resumed for i in batch] == straight


def _run_with_record(tmp_path, data: ShardedDataset):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("name: earlier\n")
    (run / "data.json").write_text(json.dumps({"train": data.record()}))
    return run


def test_replay_finds_what_the_earlier_run_trained_on_and_refuses_a_changed_set(two_sets, tmp_path):
    new, old1, _ = two_sets
    copy = ShardedDataset(shutil.copytree(old1.path, tmp_path / "old"))
    run = _run_with_record(tmp_path, copy)
    for init_from in (run, run / "export"):
        [source] = replay.recorded_sources(str(init_from))
        assert source["path"] == str(copy.path.resolve())
        data = replay.open_recorded(source, str(init_from), lambda p, key: ShardedDataset(p))
        assert len(data) == len(copy)
    manifest = json.loads((copy.path / "manifest.json").read_text())
    (copy.path / "manifest.json").write_text(json.dumps({**manifest, "command": "again"}))
    with pytest.raises(DtrainError, match="no longer matches the manifest"):
        replay.open_recorded(source, str(run), lambda p, key: ShardedDataset(p))
    (run / "data.json").unlink()
    with pytest.raises(DtrainError, match="has no data.json"):
        replay.recorded_sources(str(run))


def test_the_teacher_term_is_t_squared_kl_over_real_targets_only():
    task = get_task("classification")
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [0.0, 1.0], [-9.0, 9.0]])
    batch = {"labels": torch.tensor([0, 1, -100])}  # the third is a padding repeat
    t = 2.0
    loss = task.distill_loss(student, teacher, batch, t)
    p = torch.softmax(teacher[:2] / t, -1)
    expected = t * t * (p * (torch.log(p) - torch.log_softmax(student[:2] / t, -1))).sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(task.distill_loss(teacher, teacher, batch, t)) == pytest.approx(0.0, abs=1e-7)  # same outputs: 0
    loss.backward()
    assert student.grad[2].abs().sum() == 0 and student.grad[:2].abs().sum() > 0
    assert int(task.distill_count(batch)) == 2


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return type("Out", (), {"logits": self.logits})()


def test_a_head_with_a_teacher_weighs_labels_and_soft_targets():
    task = get_task("classification")
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "token_type_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
    student, teacher = _Fixed(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), _Fixed(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    plain = Head(task).losses(student, batch)
    taught = Head(task, teacher=Teacher(teacher, hard=0.25, soft=0.75, temperature=2.0)).losses(student, batch)
    assert set(plain) == {"cls"} and set(taught) == {"cls", "distill"}
    assert float(taught["cls"]) == pytest.approx(0.25 * float(plain["cls"]))
    kl = float(task.distill_loss(student.logits, teacher.logits, batch, 2.0))
    assert float(taught["distill"]) == pytest.approx(0.75 * kl) and kl > 0
    counts = Head(task, teacher=Teacher(teacher, 1.0, 1.0, 1.0)).counts(batch)
    assert {k: int(v) for k, v in counts.items()} == {"cls": 2, "distill": 2}


def test_a_student_keeps_the_teachers_chosen_layers_embeddings_and_head():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=2))
    teacher.eval().requires_grad_(False)
    student = student_from_layers(teacher, [0, 3], "t")
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.bert.encoder.layer) == 4  # the teacher unchanged
    for mine, theirs in ((student.bert.encoder.layer[1], teacher.bert.encoder.layer[3]),
                         (student.classifier, teacher.classifier), (student.bert.embeddings, teacher.bert.embeddings)):
        for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert student.training and all(p.requires_grad for p in student.parameters())
    ids = torch.tensor([[1, 5, 7, 2]])
    assert student(input_ids=ids).logits.shape == (1, 2)
    with pytest.raises(DtrainError, match=r"has 4 encoder layers, numbered 0..3; give distinct layers"):
        student_from_layers(teacher, [1, 1], "t")


def test_a_resume_replays_what_the_run_itself_recorded(two_sets, tmp_path):
    from types import SimpleNamespace

    new, old1, old2 = two_sets
    run_dir = tmp_path / "this-run"
    run_dir.mkdir()
    cfg = SimpleNamespace(run_dir=str(run_dir), checkpoint=SimpleNamespace(resume="auto"))
    assert replay.pinned_sources(cfg) is None  # a first start: the init_from run's record decides
    (run_dir / "data.json").write_text(json.dumps({"train": MixedDataset(new, [old2], 10, seed=1).record()}))
    assert [s["path"] for s in replay.pinned_sources(cfg)] == [str(old2.path.resolve())]
    cfg.checkpoint.resume = "none"  # starting over: the record of the earlier start does not bind
    assert replay.pinned_sources(cfg) is None
