"""distillation end to end through Dagster on tiny models: a registered teacher given as a
local dir (so the run leaves math_rl out), off-policy then on-policy training of a smaller
student, teacher samples cached by teacher and prompts, the three-way eval report, the gate
deciding registration, a cached re-run."""

import json

import pyarrow.parquet as pq
from dagster import AssetKey, DagsterInstance

from conftest import PINNED_PRECISION, TINY_RUN_CONFIG, run_job
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry

STAGES = ["teacher", "base_model", "dataset", "tokenized", "teacher_samples", "checkpoint", "eval_report", "registered_model",
          "eval_robustness", "eval_self_consistency", "eval_attribution", "judge_eval"]
SELECTION = [AssetKey(["base", "tokenizer"]), AssetKey(["base", "tiny_llama_small"])] + [AssetKey(["distillation", s]) for s in STAGES]


def run_distillation(teacher_dir: str, resources: dict | None = None):
    from crucible_jobs import defs

    ops = {
        "base__tiny_llama_small": {"config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "distillation__teacher": {"config": {"base_model": teacher_dir}},
        "distillation__dataset": {"config": {"num_examples": 120}},
        "distillation__teacher_samples": {"config": {"max_tokens": 8}},
        "distillation__checkpoint": {"config": {"max_steps": 6, "batch_size": 8, "group_size": 2, "max_tokens": 8,
                                                "learning_rate": 3e-3, "eval_every": 3, "save_every": 3, "eval_problems": 8}},
        "distillation__eval_report": {"config": {"bootstrap_samples": 200, "kl_samples": 1}},
        **{k: v for k, v in TINY_RUN_CONFIG["ops"].items() if k.startswith("distillation__eval_")},
    }
    job = defs.resolve_job_def("distillation")
    with DagsterInstance.get() as instance:
        return job.execute_in_process(run_config={"ops": ops, "resources": resources or PINNED_PRECISION},
                                      instance=instance, asset_selection=SELECTION,
                                      raise_on_error=False)


def test_distillation_from_a_local_teacher_off_then_on(homes):
    run_job("sl_basic", TINY_RUN_CONFIG)
    teacher_dir = ModelRegistry().resolve("sl_basic")["path"]
    first = run_distillation(teacher_dir)
    store = ArtifactStore()
    teacher = store.manifest(store.latest("distillation/teacher").fingerprint)
    assert teacher["summary"]["source"] == teacher_dir and teacher["upstream"] == []

    samples = pq.read_table(store.latest("distillation/teacher_samples").dir / "samples.parquet").to_pylist()
    train_rows = store.manifest(store.latest("distillation/dataset").fingerprint)["summary"]["train_rows"]
    assert len(samples) == 2 * train_rows  # two teacher completions per training prompt
    assert all(len(s["teacher_logprobs"]) == len(s["tokens"]) - 1 == len(s["weights"]) - 1 for s in samples)

    rows = [json.loads(line) for line in (store.latest("distillation/checkpoint").dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all("teacher_kl/forward" in r for r in rows[:3]) and all("teacher_kl" in r for r in rows[3:])
    report = json.loads((store.latest("distillation/eval_report").dir / "report.json").read_text())
    assert {"test/accuracy", "start/test/accuracy", "teacher/test/accuracy", "test/teacher_kl", "start/test/teacher_kl",
            "test/teacher_kl_delta_ci", "test/accuracy_delta_ci"} <= set(report)
    assert report["test/teacher_kl"] < report["start/test/teacher_kl"]  # even six steps pull the student toward the teacher

    registered = "distillation" in ModelRegistry().models()
    assert registered == (report["test/accuracy_delta_ci"][0] > 0) == first.success
    if registered:
        edge = ModelRegistry().resolve("distillation")["lineage"]["distilled_from"]
        assert edge["source"] == teacher_dir

    second = run_distillation(teacher_dir)
    cached = [e.event_specific_data.materialization.metadata["cached"].value
              for e in second.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert cached and all(cached)
