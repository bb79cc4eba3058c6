"""MLM masking and NSP pairs: the statistics BERT specifies, over more than 100k tokens."""

from collections import Counter

import numpy as np
import pytest

from dtrain.data import pretraining as P
from dtrain.data.prepare import prepare_pretrain
from dtrain.data.pretraining import IGNORE, IS_NEXT, IS_RANDOM, PretrainingCollator, truncate_pair
from dtrain.data.shards import ShardedDataset
from dtrain.model.tokenizer import load_tokenizer
from tests.conftest import make_corpus


@pytest.fixture(scope="module")
def big_data(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("big")
    corpus = make_corpus(root / "corpus", docs=400, seed=1)
    prepare_pretrain([str(corpus)], root / "data", str(tokenizer_dir), max_seq_len=128, workers=2)
    return ShardedDataset(root / "data")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def examples(col, data, epochs=1):
    for epoch in range(epochs):
        for i in range(len(data)):
            yield data[i] | {"index": i, "epoch": epoch, "pad": False}, col.example(data[i] | {"index": i,
                                                                                                "epoch": epoch,
                                                                                                "pad": False})


def test_mask_rate_and_80_10_10_split(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=3, max_predictions_per_seq=128)
    candidates = masked = 0
    actions = Counter()
    special = set(tok.all_special_ids)
    for _, e in examples(col, big_data, epochs=2):
        original = e["input_ids"].copy()
        original[e["positions"]] = e["originals"]
        candidates += sum(t not in special for t in original.tolist())
        masked += len(e["positions"])
        assert not special & set(e["originals"].tolist())  # a special token is never a prediction target
        assert original[0] == tok.cls_token_id and (original == tok.sep_token_id).sum() == 2
        assert e["input_ids"][0] == tok.cls_token_id and (e["input_ids"] == tok.sep_token_id).sum() == 2
        now = e["input_ids"][e["positions"]]
        actions["mask"] += int((now == tok.mask_token_id).sum())
        actions["same"] += int((now == e["originals"]).sum())
        actions["random"] += int(((now != tok.mask_token_id) & (now != e["originals"])).sum())
    assert candidates >= 100_000
    assert abs(masked / candidates - 0.15) < 0.01
    assert abs(actions["mask"] / masked - 0.8) < 0.01
    assert abs(actions["random"] / masked - 0.1) < 0.01
    assert abs(actions["same"] / masked - 0.1) < 0.01


def test_max_predictions_caps_the_masked_positions(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=3, max_predictions_per_seq=5)
    batch = col([big_data[i] | {"index": i, "epoch": 0, "pad": False} for i in range(16)])
    assert batch["mlm_positions"].shape == (16, 5)
    assert ((batch["mlm_labels"] != IGNORE).sum(1) == 5).all()


def test_whole_word_masking_is_all_or_nothing(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=4, whole_word_masking=True, max_predictions_per_seq=128)
    words = masked = 0
    for _, e in list(examples(col, big_data))[:2000]:
        original = e["input_ids"].copy()
        original[e["positions"]] = e["originals"]
        chosen = set(e["positions"].tolist())
        pieces = tok.convert_ids_to_tokens(original.tolist())
        groups, current = [], []
        for pos, piece in enumerate(pieces):
            if piece in ("[CLS]", "[SEP]"):
                groups.append(current)
                current = []
            elif piece.startswith("##") and current:
                current.append(pos)
            else:
                groups.append(current)
                current = [pos]
        groups.append(current)
        for g in filter(None, groups):
            inside = [p in chosen for p in g]
            assert all(inside) or not any(inside), (pieces, g, chosen)
            words += len(g) > 1 and all(inside)
        masked += len(chosen)
    assert words > 100  # multi-piece words were masked, whole
    assert masked > 0


def doc_tokens(data):
    """Each document's tokens, in order (its samples are consecutive rows)."""
    docs = {}
    for i in range(len(data)):
        docs.setdefault(int(data.get(i, "doc")), []).extend(np.asarray(data.get(i, "input_ids")).tolist())
    return {d: np.array(t) for d, t in docs.items()}


def contains(haystack, needle):
    n = len(needle)
    return n == 0 or any(np.array_equal(haystack[i:i + n], needle) for i in range(len(haystack) - n + 1))


def test_nsp_half_next_half_random_and_negatives_from_other_documents(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=5)
    docs = doc_tokens(big_data)
    labels = Counter()
    for sample, e in examples(col, big_data, epochs=2):
        labels[e["b_doc"] == int(sample["doc"])] += 1
        ids = np.asarray(sample["input_ids"])
        a, b = e["a"], e["b"]
        assert len(a) + len(b) <= 128 - 3 and len(a) and len(b)
        assert np.array_equal(a, ids[:len(a)])  # A: the sample's start
        if e["nsp"] == IS_NEXT:
            assert e["b_doc"] == sample["doc"]
            assert contains(docs[int(sample["doc"])], np.concatenate([a, b]))  # the true continuation, across samples
        else:
            assert e["nsp"] == IS_RANDOM and e["b_doc"] != sample["doc"]
            assert contains(docs[e["b_doc"]], b)  # consecutive text of the other document
    share_next = labels[True] / sum(labels.values())
    assert sum(labels.values()) > 2000
    assert abs(share_next - 0.5) < 0.02


def test_nsp_pairs_fill_their_target_length(big_data, tok):
    """A + B reach the sample's target (BERT's data generation): the budget, or for the short share a random
    length; a true-next pair falls short only where its document ends."""
    assert big_data.manifest["short_seq_prob"] == 0.1
    col = PretrainingCollator(big_data, tok, 128, seed=8)
    docs = doc_tokens(big_data)
    targets, random_short, doc_ends = [], 0, 0
    for sample, e in examples(col, big_data, epochs=2):
        keys = P.sample_keys(8, int(sample["epoch"]), np.array([int(sample["index"])]))
        target = col.target(P.uniform(keys[:, None], P._STREAM_PAIR, np.arange(P._PAIR_DRAWS))[0])
        targets.append(target)
        pair = np.concatenate([e["a"], e["b"]])
        if len(pair) == target:
            continue
        assert len(pair) < target
        if e["nsp"] == IS_NEXT:  # the document ends: B is all of its rest
            whole = docs[int(sample["doc"])]
            assert np.array_equal(whole[len(whole) - len(e["b"]):], e["b"])
            doc_ends += 1
        else:
            random_short += 1
    targets = np.array(targets)
    assert 0.08 < (targets < 125).mean() < 0.12 and targets.min() >= 2  # the 10% short-sequence rate
    assert random_short / len(targets) < 0.01  # a random B fills its budget
    assert doc_ends / len(targets) < 0.2  # 4-sample documents here


def test_examples_are_deterministic_per_seed_epoch_index(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=6)
    s = big_data[10] | {"index": 10, "epoch": 0, "pad": False}
    one, two = col.example(s), col.example(dict(s))
    assert np.array_equal(one["input_ids"], two["input_ids"])
    other_epoch = col.example(s | {"epoch": 1})
    assert not np.array_equal(one["input_ids"], other_epoch["input_ids"])


def test_batch_layout_padding_and_padding_samples(big_data, tok):
    col = PretrainingCollator(big_data, tok, 128, seed=7)
    samples = [big_data[i] | {"index": i, "epoch": 0, "pad": i == 3} for i in range(4)]
    batch = col(samples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width <= 128
    lengths = batch["attention_mask"].sum(1)
    assert width - 8 < lengths.max() <= width
    for i in range(4):
        n = int(lengths[i])
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        types = batch["token_type_ids"][i, :n]
        assert types[0] == 0 and types[n - 1] == 1
    assert (batch["mlm_labels"][3] == IGNORE).all() and batch["next_sentence_label"][3] == IGNORE
    assert batch["pad"].tolist() == [False, False, False, True]
    # mlm_labels are the original ids at mlm_positions
    for i in range(3):
        keep = batch["mlm_labels"][i] != IGNORE
        pos = batch["mlm_positions"][i][keep]
        assert (batch["attention_mask"][i, pos] == 1).all()


def test_truncate_pair_longest_first():
    a, b = np.arange(10), np.arange(4)
    ta, tb = truncate_pair(a, b, 8)
    assert (len(ta), len(tb)) == (4, 4)
    ta, tb = truncate_pair(np.arange(3), np.arange(9), 7)
    assert (len(ta), len(tb)) == (3, 4) and tb.tolist() == [0, 1, 2, 3]
    ta, tb = truncate_pair(np.arange(3), np.arange(3), 10)
    assert (len(ta), len(tb)) == (3, 3)


def test_bucket_lengths_are_the_pairs_lengths(big_data, tok):
    """data.bucket_window sorts pretraining samples by bucket_lengths: the length the pair will have, from the draws
    the collator makes and two columns, without building it (off only where a random B falls short)."""
    col = PretrainingCollator(big_data, tok, 128, seed=6)
    n = len(big_data)
    got = {epoch: col.bucket_lengths(np.arange(n), epoch) for epoch in (0, 1)}
    built = {0: np.zeros(n, dtype=np.int64), 1: np.zeros(n, dtype=np.int64)}
    for sample, e in examples(col, big_data, epochs=2):
        built[int(sample["epoch"])][int(sample["index"])] = len(e["input_ids"])
    for epoch in (0, 1):
        assert (built[epoch] == got[epoch]).mean() > 0.99
        assert 0.05 < (got[epoch] < 128).mean() < 0.3  # short targets (10%) and documents' ends
    assert (got[0] != got[1]).any()  # drawn anew each epoch
    assert (col.bucket_lengths(np.array([7, 3]), 1) == got[1][[7, 3]]).all()


def test_bucketed_pretraining_batches_carry_less_padding_and_every_sample_once(big_data, tok):
    from dtrain.data.stream import StreamingDataset, StreamLoader

    col = PretrainingCollator(big_data, tok, 128, seed=6, pad_to_multiple_of=1)

    def epoch(world, **kw):
        real = padded = 0
        seen = []
        for rank in range(world):
            ds = StreamingDataset(big_data, 8, seed=6, rank=rank, world_size=world, drop_last=False, **kw)
            for b in StreamLoader(ds, col):
                real += int(b["attention_mask"].sum())
                padded += b["attention_mask"].numel()
                seen += b["index"][~b["pad"]].tolist()
        return 1 - real / padded, seen

    plain, _ = epoch(1)
    for world in (1, 2):
        bucketed, seen = epoch(world, bucket_window=512, lengths=col.bucket_lengths)
        assert Counter(seen) == Counter(range(len(big_data)))
        assert bucketed < plain / 2, (bucketed, plain)
