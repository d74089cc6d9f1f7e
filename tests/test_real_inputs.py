"""Real data and models plug in through run config: the documented overrides file, a local
HF model directory as the base, text records through `datasets.load_dataset`, and LoRA."""

import copy
import json
from pathlib import Path

import yaml

from conftest import TINY_RUN_CONFIG, run_job
from crucible_assets.base import build_tiny_llama, train_tokenizer
from resources.store.artifact_store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def merged(overrides: dict) -> dict:
    config = copy.deepcopy(TINY_RUN_CONFIG)
    for op, body in overrides.get("ops", {}).items():
        config["ops"].setdefault(op, {"config": {}})["config"].update(body["config"])
    config["ops"]["sl_basic__checkpoint"]["config"].update(max_steps=30, eval_every=15, save_every=15)
    config["resources"] = {**config["resources"], **overrides.get("resources", {})}
    return config


def test_documented_overrides_file_runs(homes, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = yaml.safe_load((REPO / "examples" / "overrides.yaml").read_text())
    result = run_job("sl_basic", merged(overrides))
    assert result.success
    dataset = ArtifactStore().latest("sl_basic/dataset").dir
    rows = (dataset / "train.jsonl").read_text().splitlines() + (dataset / "test.jsonl").read_text().splitlines()
    repeats = ArtifactStore().manifest(ArtifactStore().latest("sl_basic/dataset").fingerprint)["summary"]["test_repeats_dropped"]
    assert len(rows) + repeats == 300 and json.loads(rows[0])["messages"][0]["role"] == "system"


def test_local_model_dir_text_records_via_datasets_and_lora(homes, tmp_path):
    train_tokenizer(tmp_path / "tok", 1024, 0)
    build_tiny_llama(tmp_path / "tok", tmp_path / "model", 64, 2, 4, 128, 256, 1)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"The answer to {i} + {i} is {2 * i}."}) + "\n" for i in range(200)))
    overrides = {"ops": {
        "sl_basic__base_model": {"config": {"base_model": str(tmp_path / "model")}},
        "sl_basic__dataset": {"config": {"source": "hf", "path": "json", "data_files": [str(docs)], "num_examples": 0}},
        "sl_basic__checkpoint": {"config": {"lora_rank": 8, "learning_rate": 0.01}},
    }}
    result = run_job("sl_basic", merged(overrides))
    assert result.success
    store = ArtifactStore()
    base = store.manifest(store.latest("sl_basic/base_model").fingerprint)
    assert base["config"]["base_model"] == str(tmp_path / "model") and base["upstream"] == []
    state = store.latest("sl_basic/checkpoint").dir / "state" / "model"
    assert (state / "adapter_model.safetensors").exists()  # LoRA trains an adapter
    report = json.loads((store.latest("sl_basic/eval_report").dir / "report.json").read_text())
    assert report["test/nll_delta_ci"][1] < 0
