"""`crucible audit --reproduce`: the whole chain re-materialized into a scratch store with the
recorded run config gives bit-identical data versions; one changed byte in a source data
file makes it fail, naming the first asset that differs and the input that changed."""

import copy
import json

import pytest

from conftest import TINY_RUN_CONFIG, run_job
from resources.datasets.synthetic import arithmetic_conversations
from crucible_jobs.cli import main as crucible
from crucible_jobs.reproduce import input_changes


def test_input_changes_name_the_field_and_the_upstream():
    original = {"code_version": "1", "config": {"seed": 0, "lr": {"peak": 1}}, "extra_inputs": {"records_hash": "aa"},
                "backend": None, "upstream": [{"key": "r/dataset", "content_hash": "11"}]}
    rebuilt = copy.deepcopy(original) | {"config": {"seed": 0, "lr": {"peak": 2}}, "extra_inputs": {"records_hash": "bb"},
                                         "upstream": [{"key": "r/dataset", "content_hash": "22"}]}
    assert input_changes(original, rebuilt) == ["config.lr.peak: 1 -> 2", "extra_inputs.records_hash: 'aa' -> 'bb'",
                                                "upstream r/dataset: 11 -> 22"]


@pytest.mark.slow
def test_reproduce_passes_then_names_the_dataset_after_one_byte_changes(homes, tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_conversations(600, 3)))
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["sl_basic__dataset"]["config"] = {"source": "jsonl", "path": str(source)}
    assert run_job("sl_basic", config).success
    capsys.readouterr()

    assert crucible(["audit", "sl_basic@champion", "--reproduce", "--scratch", str(tmp_path / "scratch1")]) == 0
    out = capsys.readouterr().out
    assert "reproduce passed" in out and "IDENTICAL      sl_basic/registered_model" in out
    assert not (tmp_path / "scratch1").exists()  # a passing reproduction leaves no scratch behind

    data = bytearray(source.read_bytes())
    at = data.index(b'"content": "0 + ')  # an answer's first operand: still valid JSON and a valid chat
    data[at + 12] = ord("1")
    source.write_bytes(bytes(data))
    assert crucible(["audit", "sl_basic@champion", "--reproduce", "--scratch", str(tmp_path / "scratch2")]) == 1
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("reproduce failed"))
    assert "first asset that differs: sl_basic/dataset" in verdict and "extra_inputs.records_hash" in verdict
    assert "IDENTICAL      base/tiny_llama" in out and "INPUTS_CHANGED sl_basic/checkpoint" in out
