"""The feedback loop: records validated like every other loader, curated into the record
formats chat_sl and dpo load, and the sensors that turn new feedback into retraining."""

import json
from pathlib import Path

import pytest
from dagster import DagsterInstance, build_sensor_context

from conftest import run_job, tree_digest
from crucible_assets.feedback import load_feedback, rating_drop, sft_examples, validate_feedback
from crucible_jobs import defs
from crucible_jobs.sensors import FeedbackTriggers, feedback_sensor
from resources.store.artifact_store import ArtifactStore
from resources.datasets.sources import DatasetConfig, DatasetError, load_records, validate_record
from resources.datasets.pairs import validate_pair
from resources.store.registry import ModelRegistry

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def feedback(rating, response="2 + 3 = 5", edited=None, model_version="chat_sl:1", prompt="What is 2 + 3?") -> dict:
    record = {"prompt": prompt, "response": response, "rating": rating, "model_version": model_version}
    return record if edited is None else {**record, "edited_response": edited}


def write(folder: Path, name: str, records: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / name


@pytest.mark.parametrize("bad, field, problem", [
    ({k: v for k, v in feedback(5).items() if k != "rating"}, "rating", "missing"),
    (feedback(7), "rating", "outside 1..5"),
    (feedback("5"), "rating", "expected a number"),
    (feedback(True), "rating", "expected a number"),
    (feedback(3, prompt=""), "prompt", "empty"),
    (feedback(3, prompt=PROMPT + [{"role": "assistant", "content": "hi"}]), "prompt[1].role", "must end with the user's turn"),
    (feedback(3, prompt=[{"role": "user", "content": 3}]), "prompt[0].content", "expected a string, got int"),
    (feedback(3, prompt=[{"role": "robot", "content": "x"}]), "prompt[0].role", "expected one of"),
    (feedback(3, edited=3), "edited_response", "expected a string, got int"),
    (feedback(3, model_version="latest"), "model_version", "not a registry version"),
])
def test_a_bad_feedback_record_is_named_by_file_line_and_field(tmp_path, bad, field, problem):
    path = write(tmp_path, "day1.jsonl", [feedback(5), bad])
    with pytest.raises(DatasetError) as error:
        load_feedback(tmp_path)
    assert f"{path}: line 2: field {field!r}: " in str(error.value) and problem in str(error.value)


def test_the_feedback_job_fails_on_a_bad_record_and_writes_nothing(homes):
    crucible_home, _ = homes
    with pytest.raises(DatasetError, match="no feedback files"):
        load_feedback(crucible_home / "feedback")
    path = write(crucible_home / "feedback", "day1.jsonl", [feedback(5), feedback(9)])
    before = tree_digest(crucible_home)
    result = run_job("feedback", {}, raise_on_error=False)
    assert not result.success
    message = str(next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error)
    assert f"{path}: line 2: field 'rating'" in message
    assert tree_digest(crucible_home) == before


def test_feedback_is_curated_into_examples_and_pairs_that_chat_sl_and_dpo_load(homes, tmp_path):
    crucible_home, _ = homes
    write(crucible_home / "feedback", "a.jsonl", [
        feedback(5),                                                  # well rated: an SFT example as answered
        feedback(2, response="2 + 3 = 6"),                            # poorly rated, not corrected: dropped
        feedback(1, response="2 + 3 = 7", edited="2 + 3 = 5"),        # corrected: SFT on the edit, and a pair
    ])
    conversation = PROMPT + [{"role": "assistant", "content": "4 + 4 = 8"}, {"role": "user", "content": "Now add 1."}]
    write(crucible_home / "feedback", "b.jsonl", [
        feedback(4.5, response="8 + 1 = 10", edited="8 + 1 = 9", prompt=conversation),
        feedback(3, edited="2 + 3 = 5"),                              # an "edit" that changes nothing is no correction
    ])
    assert run_job("feedback", {}).success
    store = ArtifactStore()
    assert store.manifest(store.latest("feedback/dataset").fingerprint)["summary"]["rows"] == 5

    sft_path = store.latest("feedback/sft_examples").dir / "sft.jsonl"
    sft = load_records(DatasetConfig(source="jsonl", path=str(sft_path)), validate_record)  # chat_sl's loader
    assert [m["messages"][-1]["content"] for m in sft] == ["2 + 3 = 5", "2 + 3 = 5", "8 + 1 = 9"]
    assert sft[2]["messages"][:-1] == conversation

    pairs_path = store.latest("feedback/dpo_pairs").dir / "pairs.jsonl"
    pairs = load_records(DatasetConfig(source="jsonl", path=str(pairs_path)), validate_pair)  # dpo's loader
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs] == [
        ("2 + 3 = 5", "2 + 3 = 7"), ("8 + 1 = 9", "8 + 1 = 10")]

    # each new version of the curated data starts its recipe on it, once
    with DagsterInstance.get() as instance:
        sensors = {s.name: s for s in defs.sensors}
        for sensor_name, recipe, path in [("chat_sl_on_feedback", "chat_sl", sft_path), ("dpo_on_feedback", "dpo", pairs_path)]:
            sensor = sensors[sensor_name]
            assert sensor.job_name == recipe
            tick = sensor.evaluate_tick(build_sensor_context(instance=instance))
            [request] = tick.run_requests
            assert request.run_config["ops"][f"{recipe}__dataset"]["config"] == {"source": "jsonl", "path": str(path), "num_examples": 0}
            assert request.run_key == path.parent.name  # the artifact's content hash, its data version
            assert not sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=tick.cursor)).run_requests


def test_curation_threshold_and_rating_drop():
    records = [feedback(r, model_version=v) for r, v in
               [(5, "chat_sl:2"), (4, "chat_sl:2"), (1, "chat_sl:1"), (3, "chat_sl:2"), (2, "chat_sl:2")]]
    records = [validate_feedback(r, "test", f"record {i}") for i, r in enumerate(records)]
    assert len(sft_examples(records, 4.0)) == 2 and len(sft_examples(records, 5.0)) == 1
    assert rating_drop(records, "chat_sl:2", 2) == pytest.approx(4.5 - 2.5)
    assert rating_drop(records, "chat_sl:2", 3) is None  # two windows need six ratings
    assert rating_drop(records, "chat_sl:1", 1) is None


def test_feedback_sensor_triggers_on_new_examples_and_once_per_champion_rating_drop(homes):
    crucible_home, _ = homes
    folder = crucible_home / "feedback"
    sensor = feedback_sensor(FeedbackTriggers(min_new_examples=3, rating_window=2, max_rating_drop=1.0))
    assert sensor.job_name == "feedback"

    def tick(cursor=None):
        return sensor.evaluate_tick(build_sensor_context(cursor=cursor, resources={"registry": ModelRegistry()}))

    assert "no feedback files" in tick().skip_message
    write(folder, "1.jsonl", [feedback(5), feedback(4)])
    assert not tick().run_requests  # two examples < 3
    write(folder, "2.jsonl", [feedback(2, response="2 + 3 = 6", edited="2 + 3 = 5")])
    first = tick()
    [request] = first.run_requests
    assert request.run_config["ops"]["feedback__dataset"]["config"]["folder"] == str(folder)
    assert not tick(first.cursor).run_requests  # no new examples since

    # the champion's ratings fall: its first two average 4.5, its latest two 2
    registry = ModelRegistry()
    registry.register("chat_sl", {"fingerprint": "ab", "metrics": {"test/nll": 1.0}},
                      gate={"metric": "test/nll", "lower_is_better": True, "margin": 0.0})
    registry.judge("chat_sl", 1, who="test")  # the first version becomes champion
    write(folder, "3.jsonl", [feedback(5), feedback(4), feedback(2), feedback(2)])
    drop = tick(first.cursor)
    assert len(drop.run_requests) == 1 and drop.run_requests[0].run_key != request.run_key
    assert not tick(drop.cursor).run_requests  # one trigger per champion and drop

    write(folder, "4.jsonl", [{"prompt": "x"}])
    with pytest.raises(Exception, match=r"4\.jsonl: line 1: field 'response': missing"):
        tick(drop.cursor)
