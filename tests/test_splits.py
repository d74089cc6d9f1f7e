"""Held-out sets are disjoint from training by item identity (the normalised prompt or
question): the split puts no identity on both sides, whatever the generator or the file, and
the blocking check `held_out_disjoint` names a leaking record by the user's file and line."""

import json

import pytest

from conftest import TINY_RUN_CONFIG, run_job
from crucible_assets.checks import offending_records, record_frame, validate
from resources.datasets.sources import DatasetConfig, DatasetError, load_records
from resources.datasets.splits import held_out_score, record_identity, split_records
from resources.datasets.synthetic import GENERATORS
from resources.store.artifact_store import ArtifactRef, ArtifactStore


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def assert_disjoint_by_identity(records, train, test, test_fraction):
    distinct = {record_identity(r) for r in records}
    train_ids, test_ids = [record_identity(r) for r in train], [record_identity(r) for r in test]
    assert not set(train_ids) & set(test_ids)
    assert len(test_ids) == len(set(test_ids))  # each held-out item once
    # held out by a seeded hash: the share is test_fraction up to binomial noise (4 standard deviations)
    assert abs(len(test_ids) / len(distinct) - test_fraction) <= 4 * (test_fraction * (1 - test_fraction) / len(distinct)) ** 0.5 + 1 / len(distinct)
    assert set(train_ids) | set(test_ids) == distinct
    assert len(train) == sum(record_identity(r) not in set(test_ids) for r in records)  # train keeps every repeat


@pytest.mark.parametrize("generator", sorted(GENERATORS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("test_fraction", [0.1, 0.3])
def test_no_identity_is_on_both_sides_for_every_generator(generator, seed, test_fraction):
    records = GENERATORS[generator](600, seed)
    train, test = split_records(records, test_fraction, seed)
    assert_disjoint_by_identity(records, train, test, test_fraction)
    assert split_records(records, test_fraction, seed) == (train, test)  # seeded


def test_an_item_is_held_out_by_itself_the_seed_and_the_fraction_alone():
    """So the recipes of a chain agree on every item they share, whatever else each one holds."""
    chats = GENERATORS["arithmetic"](2000, 0)
    problems = GENERATORS["arithmetic_problems"](700, 3)  # other draws of the same questions
    chat_test = {record_identity(r) for r in split_records(chats, 0.2, 0)[1]}
    problem_train, problem_test = split_records(problems, 0.2, 0)
    shared = {record_identity(r) for r in chats} & {record_identity(r) for r in problems}
    assert len(shared) > 300
    assert {record_identity(r) for r in problem_test} & shared == chat_test & shared  # math_rl tests what sl_basic held out
    assert not {record_identity(r) for r in problem_train} & chat_test
    smaller = {record_identity(r) for r in split_records(chats, 0.1, 0)[1]}
    assert smaller < chat_test  # a smaller fraction holds out a subset
    assert {record_identity(r) for r in split_records(chats[:500], 0.2, 0)[1]} <= chat_test  # appending moves nothing
    assert {record_identity(r) for r in split_records(chats, 0.2, 1)[1]} != chat_test  # the seed draws another set
    assert all(held_out_score(i, 0) < 0.2 for i in chat_test)


def test_identity_is_the_normalised_prompt_of_each_kind():
    assert record_identity(chat("What is  1 + 2?", "3")) == record_identity(chat("what is 1 + 2?\n", "1 + 2 = 3"))
    assert record_identity(chat("What is 1 + 2?", "3")) != record_identity(chat("What is 1 + 3?", "3"))
    system = {"messages": [{"role": "system", "content": "Be brief."}, *chat("What is 1 + 2?", "3")["messages"]]}
    assert record_identity(system) != record_identity(chat("What is 1 + 2?", "3"))  # the system prompt is asked too
    turns = chat("What is 1 + 2?", "3")["messages"] + [{"role": "user", "content": "Now add 4."},
                                                       {"role": "assistant", "content": "7"}]
    assert record_identity({"messages": turns}) == record_identity({"messages": turns[:3] + [{"role": "assistant", "content": "8"}]})
    pair = {"chosen": turns, "rejected": turns[:3] + [{"role": "assistant", "content": "8"}]}
    assert record_identity(pair) == record_identity({"messages": turns})
    assert record_identity({"question": "What is 2 + 2?", "answer": "4"}) == record_identity({"question": " WHAT is 2 +  2?", "answer": "5"})
    assert record_identity({"question": "What is 2 + 2?", "answer": "4"}) == record_identity(chat("What is 2 + 2?", "2 + 2 = 4"))
    assert record_identity({"text": "A  b"}) == record_identity({"text": "a b"})


def test_a_user_file_with_repeated_prompts_splits_by_prompt_and_keeps_its_lines(tmp_path):
    lines = [chat(f"What is {i % 7} + 1?" if i % 3 else f"WHAT is  {i % 7} + 1?", f"{i % 7 + 1}") for i in range(40)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    sources: list[str] = []
    records = load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=0), sources=sources)
    train, test = split_records(list(zip(records, sources)), 0.3, 0, identity=lambda rs: record_identity(rs[0]))
    assert_disjoint_by_identity(records, [r for r, _ in train], [r for r, _ in test], 0.3)
    assert len(test) == 1  # 7 distinct questions, those whose seeded hash falls under 0.3 held out (one here), each once
    for record, origin in train + test:  # each record keeps the user's own line
        line = int(origin.rsplit("line ", 1)[1])
        assert origin.startswith(f"{path}: line ") and lines[line - 1] == record


def test_one_distinct_item_leaves_nothing_to_train_on():
    with pytest.raises(DatasetError, match="hold 1 distinct items .* leaves nothing to train on"):
        split_records([chat("What is 1 + 1?", "2")] * 30, 0.1, 0)


def _stored(tmp_path, splits: dict[str, list[tuple[dict, str]]]) -> ArtifactRef:
    """A dataset artifact as the dataset asset writes one: the splits and where each record came from."""
    for split, rows in splits.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    (tmp_path / "sources.json").write_text(json.dumps({split: [o for _, o in rows] for split, rows in splits.items()}))
    return ArtifactRef(key="r/dataset", fingerprint="ab", content_hash="cd", path=str(tmp_path))


def test_held_out_disjoint_fails_on_a_leaky_dataset_naming_file_and_line(tmp_path):
    user = "/data/chats.jsonl"
    train = [(chat(f"What is {i} + 1?", f"{i + 1}"), f"{user}: line {i + 1}") for i in range(10)]
    test = [(chat("What is 11 + 1?", "12"), f"{user}: line 12"), (chat("what is  3 + 1?", "4!"), f"{user}: line 14")]
    dataset = _stored(tmp_path, {"train": train, "test": test})
    ok, details = validate(record_frame(dataset))["held_out_disjoint"]
    assert not ok
    [offending] = offending_records(dataset, details)
    assert offending.startswith(f"{user}: line 14: ") and "3 + 1" in offending

    clean = _stored(tmp_path, {"train": train, "test": test[:1]})
    assert validate(record_frame(clean))["held_out_disjoint"][0]


def test_the_dataset_asset_holds_out_by_item_and_its_check_passes(homes, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(chat(f"What is {i % 20} + 2?", f"{i % 20 + 2}")) + "\n" for i in range(100)))
    config = {**TINY_RUN_CONFIG, "ops": {"sl_basic__dataset": {"config": {"source": "jsonl", "path": str(path),
                                                                           "num_examples": 0, "test_fraction": 0.2}}}}
    result = run_job("sl_basic", config, assets=["sl_basic/dataset"])
    [disjoint] = [e for e in result.get_asset_check_evaluations() if e.check_name == "held_out_disjoint"]
    assert disjoint.passed
    ref = ArtifactStore().latest("sl_basic/dataset")
    summary = ArtifactStore().manifest(ref.fingerprint)["summary"]
    assert (summary["train_items"], summary["test_items"], summary["train_rows"], summary["test_repeats_dropped"]) == (15, 5, 75, 20)
