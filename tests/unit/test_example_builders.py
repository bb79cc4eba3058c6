"""The pure pieces of the example builders: splitting, de-duplication, People's Daily → BIO."""

from dtrain.data.example_sets import dedupe, people_daily_sentences, stratified_split


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    records = [{"id": i, "label": "a" if i % 4 else "b"} for i in range(1000)]
    one = stratified_split(records)
    assert [r["id"] for r in one["dev"]] == [r["id"] for r in stratified_split(records)["dev"]]
    assert [r["id"] for r in one["dev"]] != [r["id"] for r in stratified_split(records, seed=7)["dev"]]
    ids = [r["id"] for part in one.values() for r in part]
    assert sorted(ids) == list(range(1000))  # every record in exactly one split
    assert {s: len(p) for s, p in one.items()} == {"train": 800, "dev": 100, "test": 100}
    for part in one.values():
        share_b = sum(r["label"] == "b" for r in part) / len(part)
        assert abs(share_b - 0.25) < 0.01


def test_dedupe_keeps_first_and_drops_conflicting_labels():
    records = [{"text": "Good  film", "label": "pos"}, {"text": "good film", "label": "pos"},
               {"text": "meh", "label": "pos"}, {"text": "MEH", "label": "neg"}, {"text": "bad", "label": "neg"}]
    kept, dups, ambiguous = dedupe(records)
    assert [r["text"] for r in kept] == ["Good  film", "bad"]
    assert (dups, ambiguous) == (1, 1)


def test_people_daily_to_character_bio():
    line = "国家/n  主席/n  江/nr  泽民/nr  在/p  北京/ns  会见/v  新华社/nt  记者/n  。/w  他/r  说/v"
    (chars1, tags1), (chars2, tags2) = list(people_daily_sentences(line))
    assert "".join(chars1) == "国家主席江泽民在北京会见新华社记者。"
    # surname + given name (two nr words) are one person: B-PER I-PER I-PER
    assert tags1[4:7] == ["B-PER", "I-PER", "I-PER"]
    assert tags1[8:10] == ["B-LOC", "I-LOC"]
    assert tags1[12:15] == ["B-ORG", "I-ORG", "I-ORG"]
    assert tags1[-1] == "O"
    assert "".join(chars2) == "他说" and set(tags2) == {"O"}


def test_adjacent_places_stay_separate_entities():
    (_, tags), = people_daily_sentences("中国/ns  北京/ns")
    assert tags == ["B-LOC", "I-LOC", "B-LOC", "I-LOC"]
