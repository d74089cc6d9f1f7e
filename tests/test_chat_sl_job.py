"""chat_sl end to end through Dagster on a tiny model: builds the chain from sl_basic,
trains packed on the assistant turns, registers with the lineage edge to sl_basic's model,
caches, trains on the README's local conversations file, and fails loudly on an example
with nothing to train."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN_CONFIG, run_job, tree_digest
from crucible_jobs.cli import main as crucible
from resources.store.artifact_store import ArtifactStore
from resources.store.lineage import walk
from resources.store.registry import ModelRegistry
from test_sl_basic_job import cached_flags, data_versions

REPO = Path(__file__).resolve().parents[1]


def test_chat_sl_builds_on_sl_basic_and_caches(homes, capsys):
    first = run_job("chat_sl", TINY_RUN_CONFIG)
    assert first.success
    versions = data_versions(first)
    assert {"sl_basic/registered_model", "chat_sl/base_model", "chat_sl/registered_model"} <= set(versions)

    store, registry = ArtifactStore(), ModelRegistry()
    base = store.manifest(store.latest("chat_sl/base_model").fingerprint)
    assert [u["key"] for u in base["upstream"]] == ["sl_basic/registered_model"]
    entry = registry.resolve("chat_sl@champion")
    assert entry["lineage"]["fine_tuned_from"]["model"] == "sl_basic:1"
    assert entry["lineage"]["fine_tuned_from"]["source"] == "sl_basic/registered_model"

    tokenized = store.manifest(store.latest("chat_sl/tokenized").fingerprint)["summary"]
    assert tokenized["stop"] == ["<|im_end|>"] and tokenized["train_truncated"] == 0
    checkpoint = store.manifest(store.latest("chat_sl/checkpoint").fingerprint)["summary"]
    assert 0 <= checkpoint["padding_fraction"] <= checkpoint["padding_fraction_unpacked"]
    report = json.loads((store.latest("chat_sl/eval_report").dir / "report.json").read_text())
    assert report["test/nll_delta_ci"][1] < 0
    assert "test/accuracy_delta_ci" in report and report["samples"]
    assert all(not s["completion"].endswith("<|im_end|>") for s in report["samples"])

    # shared ancestors (base/, sl_basic/*) appear in full once, then as stubs
    assert crucible(["lineage", "chat_sl/registered_model", "--json"]) == 0
    nodes = list(walk(json.loads(capsys.readouterr().out)))
    full = [n["fingerprint"] for n in nodes if not n.get("shown_above")]
    assert len(full) == len(set(full)) and any(n.get("shown_above") for n in nodes)
    assert {"base/tokenizer", "sl_basic/dataset", "chat_sl/dataset"} <= {n["key"] for n in nodes}

    objects = tree_digest(store.base / "objects")
    second = run_job("chat_sl", TINY_RUN_CONFIG)
    assert all(cached_flags(second).values()) and data_versions(second) == versions
    assert tree_digest(store.base / "objects") == objects
    assert [len(m["versions"]) for m in registry.models().values()] == [1, 1]


def _with(overrides: dict) -> dict:
    config = copy.deepcopy(TINY_RUN_CONFIG)
    for op, body in overrides["ops"].items():
        config["ops"].setdefault(op, {"config": {}})["config"].update(body["config"])
    config["ops"]["chat_sl__checkpoint"]["config"].update(max_steps=20, eval_every=10, save_every=10)
    return config


def test_readme_override_trains_on_local_conversations(homes, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = yaml.safe_load((REPO / "examples" / "chat_sl.yaml").read_text())
    result = run_job("chat_sl", _with(overrides))
    assert result.success
    dataset = ArtifactStore().latest("chat_sl/dataset").dir
    rows = [json.loads(line) for split in ("train", "test") for line in (dataset / f"{split}.jsonl").read_text().splitlines()]
    repeats = ArtifactStore().manifest(ArtifactStore().latest("chat_sl/dataset").fingerprint)["summary"]["test_repeats_dropped"]
    assert len(rows) + repeats == 240 and all(len(r["messages"]) >= 4 for r in rows)


def _failed_step(result):
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.step_key, failure.event_specific_data.error.to_string()


def good(i: int) -> dict:
    """A distinct question per record: the split holds out items, so a file of one question has nothing to train on."""
    return {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]}


GOOD = [good(i) for i in range(25)]


def _run_on(tmp_path, records, **tokenize):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _with({"ops": {"chat_sl__dataset": {"config": {"source": "jsonl", "path": str(path), "test_fraction": 0.1}},
                            "chat_sl__tokenized": {"config": tokenize}}})
    return run_job("chat_sl", config, raise_on_error=False)


def test_example_with_nothing_to_train_fails_loudly(homes, tmp_path):
    long_question = {"messages": [{"role": "user", "content": "Please " * 80 + "say hi."}, {"role": "assistant", "content": "Hi"}]}
    result = _run_on(tmp_path, GOOD[:20] + [long_question] + GOOD[20:], max_length=48, train_on_what="last_assistant_message",
                     overlong="error")
    assert not result.success
    step, message = _failed_step(result)
    assert step == "chat_sl__tokenized"
    assert "sum to zero within max_length 48" in message and "field 'messages'" in message and "Please" in message
    assert f"{tmp_path / 'chats.jsonl'}: line 21 (" in message  # the user's file and line, not the store's copy
    assert not (ArtifactStore().base / "refs" / "chat_sl" / "tokenized.json").exists()


def test_conversation_ending_on_a_user_turn_is_blocked_by_the_checks(homes, tmp_path):
    ends_with_user = {"messages": good(99)["messages"] + [{"role": "user", "content": "Thanks"}]}
    result = _run_on(tmp_path, GOOD[:20] + [ends_with_user] + GOOD[20:])
    assert not result.success
    step, message = _failed_step(result)
    assert step == "chat_sl__dataset_checks"  # the alternation check is blocking
    assert not (ArtifactStore().base / "refs" / "chat_sl" / "tokenized.json").exists()
    alternation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "alternation")
    offending = alternation.metadata["first_offending_records"].value  # the user's file and line, shuffled or not
    assert not alternation.passed and len(offending) == 1 and offending[0].startswith(f"{tmp_path / 'chats.jsonl'}: line 21: ")
