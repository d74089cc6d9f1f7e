"""The feedback loop end to end, as a user runs it: `crucible serve` answers chat questions
with chat_sl's champion through the `openai` client, people rate the answers through
/v1/feedback, and a real `dagster-daemon` with the feedback sensors started curates that
feedback and retrains chat_sl on it: a new registry version, trained on the curated
feedback, judged by the promotion gate, and followed by the server if it was promoted."""

import copy
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from conftest import TINY_RUN_CONFIG, config_for, env_with, run_job
from crucible_assets.feedback import load_feedback
from resources.store.artifact_store import ArtifactStore
from resources.store.jsonl import read_jsonl
from resources.store.registry import ModelRegistry
from test_automation import write_automation_config, write_dagster_yaml

QUESTIONS = 50
EDITED = 5  # the first few answers get a person's correction
SENSORS = ("feedback_retraining", "chat_sl_on_feedback")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """The whole process group: a daemon's run workers and code server die with it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:  # the group is gone already
        process.wait()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def wait_for_health(http: httpx.Client, url: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"crucible serve exited ({server.returncode}):\n{tail(log)}"
        if f"Uvicorn running on {url}" in tail(log):  # bound by this server, not answered by another on the port
            response = http.get(f"{url}/health", timeout=5)
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(0.5)
    pytest.fail(f"crucible serve never answered /health:\n{tail(log)}")


def failure(instance: DagsterInstance, run) -> str:
    """What a failed run logged at error level, its step failures' tracebacks included."""
    errors = [e for e in instance.all_logs(run.run_id) if e.level >= logging.ERROR]
    text = "\n".join(e.dagster_event.event_specific_data.error.to_string()
                     if e.dagster_event_type == DagsterEventType.STEP_FAILURE and e.dagster_event.event_specific_data.error
                     else e.user_message for e in errors)
    return f"{run.job_name} run {run.run_id} failed:\n{text[-3000:]}"


def questions() -> list[tuple[int, int]]:
    """Distinct sums in sl_basic's operand range, so no question lands in both splits."""
    pairs = [(a, b) for a in range(20) for b in range(20)]
    return random.Random(7).sample(pairs, QUESTIONS)


@pytest.mark.slow
def test_feedback_on_served_answers_retrains_chat_sl_under_a_running_daemon(homes, tmp_path, monkeypatch):
    crucible_home, dagster_home = homes
    for variable in ("CRUCIBLE_FEEDBACK_DIR", "CRUCIBLE_SERVE_API_KEY", "CRUCIBLE_DROP_DIR"):
        monkeypatch.delenv(variable, raising=False)
    write_dagster_yaml(dagster_home)
    config = copy.deepcopy(TINY_RUN_CONFIG)  # the shared dict stays as it is for every other test

    # 1. chat_sl:1, the champion the server answers with
    assert run_job("chat_sl", config).success
    registry, store = ModelRegistry(), ArtifactStore()
    v1 = registry.resolve("chat_sl@champion")
    assert v1["version"] == 1
    v1_dataset = store.latest("chat_sl/dataset")
    assert store.manifest(v1_dataset.fingerprint)["config"]["source"] == "synthetic"

    # 2. what the sensors' runs use: the tiny settings, fp32
    write_automation_config(crucible_home, "chat_sl", config_for("chat_sl", config))
    write_automation_config(crucible_home, "feedback", config_for("feedback", config))

    env = env_with(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log, daemon_log = tmp_path / "serve.log", tmp_path / "daemon.log"
    server = daemon = None
    http = httpx.Client(trust_env=False)  # never through a proxy from the environment
    try:
        with open(server_log, "wb") as out:
            server = subprocess.Popen([str(BIN / "crucible"), "serve", "chat_sl", "--port", str(port), "--threads", "1",
                                       "--precision", "fp32"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        health = wait_for_health(http, url, server, server_log)

        def served_version() -> str:
            assert server.poll() is None, f"crucible serve exited ({server.returncode}):\n{tail(server_log)}"
            return http.get(f"{url}/health", timeout=5).json()["model_version"]

        assert health["model_version"] == "chat_sl:1" and health["follows"] == "chat_sl@champion"

        # 3. fifty questions through the openai client, fifty ratings through /v1/feedback
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)
        expected = []
        for i, (a, b) in enumerate(questions()):
            question = f"What is {a} + {b}?"
            completion = client.chat.completions.create(model="chat_sl", messages=[{"role": "user", "content": question}],
                                                        temperature=0, max_tokens=16)
            assert completion.model_extra["model_version"] == "chat_sl:1"
            answer = completion.choices[0].message.content
            edit = f"{a} + {b} = {a + b}" if i < EDITED else None
            body = {"response_id": completion.id, "rating": 5 if i % 2 else 4,
                    **({"edited_response": edit} if edit else {})}
            posted = http.post(f"{url}/v1/feedback", json=body, timeout=30)
            assert posted.status_code == 200, (question, answer, posted.text)
            assert posted.json()["model_version"] == "chat_sl:1"
            expected.append({"prompt": question, "response": answer, "edited_response": edit, "rating": body["rating"]})

        files = sorted((crucible_home / "feedback").glob("*.jsonl"))
        assert files and all(f.name.startswith("served-") for f in files)
        records = load_feedback(crucible_home / "feedback")  # the feedback job's own validation
        assert len(records) == QUESTIONS and {r["model_version"] for r in records} == {"chat_sl:1"}
        assert [(r["prompt"], r["response"], r["edited_response"], r["rating"]) for r in records] == [
            ([{"role": "user", "content": e["prompt"]}], e["response"], e["edited_response"], e["rating"]) for e in expected]

        # 4. the daemon curates the feedback and retrains chat_sl on it
        for name in SENSORS:
            started = subprocess.run([sys.executable, "-m", "dagster", "sensor", "start", name, "-m", "crucible_jobs"],
                                     env=env, capture_output=True, text=True, timeout=300)
            assert started.returncode == 0 and f"Started sensor {name}" in started.stdout, started.stderr[-3000:]
        with open(daemon_log, "wb") as out:
            daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "crucible_jobs"], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)

        def judged_v2() -> dict | None:
            versions = registry.models().get("chat_sl", {"versions": []})["versions"]
            return versions[1] if len(versions) > 1 and "decision" in versions[1] else None

        deadline = time.monotonic() + 900  # bounds a hung daemon; the runs take a minute or two of CPU
        while judged_v2() is None and time.monotonic() < deadline:
            assert daemon.poll() is None, tail(daemon_log)
            with DagsterInstance.get() as instance:
                failed = [r for r in instance.get_runs() if r.status == DagsterRunStatus.FAILURE]
                assert not failed, f"{failure(instance, failed[0])}\n{tail(daemon_log)}"
            time.sleep(3)
        v2 = judged_v2()
        assert v2 is not None, f"no judged chat_sl:2 before the deadline:\n{tail(daemon_log)}"

        # the version was trained on the curated feedback, not on the synthetic chats
        sft = store.latest("feedback/sft_examples")
        curated = read_jsonl(sft.dir / "sft.jsonl")
        assert len(curated) == QUESTIONS  # every rating was >= 4
        assert [c["messages"][-1]["content"] for c in curated] == [e["edited_response"] or e["response"] for e in expected]
        dataset = store.latest("chat_sl/dataset")
        dataset_manifest = store.manifest(dataset.fingerprint)
        assert dataset_manifest["config"]["source"] == "jsonl"
        assert dataset_manifest["config"]["path"] == str(sft.dir / "sft.jsonl")
        assert v2["data_hashes"]["chat_sl/dataset"] == dataset.content_hash != v1["data_hashes"]["chat_sl/dataset"]
        trained_on = [json.loads(line) for split in ("train", "test") for line in (dataset.dir / f"{split}.jsonl").read_text().splitlines()]
        assert sorted(r["messages"][0]["content"] for r in trained_on) == sorted(f"What is {a} + {b}?" for a, b in questions())
        # and was measured on held-out feedback: each reference answer is the one a person rated or wrote
        answers = {e["prompt"]: e["edited_response"] or e["response"] for e in expected}
        report = json.loads((store.lookup(v2["eval_report"]).dir / "report.json").read_text())
        assert report["samples"] and all(s["reference"] == answers[re.search(r"What is \d+ \+ \d+\?", s["prompt"])[0]]
                                         for s in report["samples"])
        tokenized = store.latest("chat_sl/tokenized")
        assert v2["lineage"]["datasets"]["chat_sl/tokenized"] == tokenized.content_hash
        assert dataset.content_hash in [u["content_hash"] for u in store.manifest(tokenized.fingerprint)["upstream"]]

        with DagsterInstance.get() as instance:
            runs = {r.run_id: r for r in instance.get_runs()}
            retrain = runs[v2["run_id"]]
            assert retrain.job_name == "chat_sl" and retrain.tags["dagster/sensor_name"] == "chat_sl_on_feedback"
            assert retrain.tags["crucible/trigger"] == "feedback/sft_examples"
            assert retrain.run_config["ops"]["chat_sl__checkpoint"] == config["ops"]["chat_sl__checkpoint"]
            assert retrain.run_config["resources"] == config["resources"]
            [curation] = [r for r in runs.values() if r.job_name == "feedback"]
            assert curation.tags["dagster/sensor_name"] == "feedback_retraining" and curation.status == DagsterRunStatus.SUCCESS
            curated_by = {e.asset_materialization.metadata["fingerprint"].value for e in instance.all_logs(
                curation.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
                if e.asset_materialization.asset_key.to_user_string() == "feedback/sft_examples"}
            assert curated_by == {sft.fingerprint}  # the curated data it trained on is what the sensor's curation made
            checks = {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed
                      for e in instance.all_logs(retrain.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)}
            assert checks["beats_starting_model"] is True  # it reached the registry through the blocking gate
            assert checks["beats_champion"] == v2["decision"]["passed"]  # and the promotion gate judged it

        # judged once, recorded in the audit log; the server follows the champion wherever it is now
        assert [e["version"] for e in registry.audit_log() if e["event"] == "judge" and e["model"] == "chat_sl"] == [1, 2]
        champion = registry.resolve("chat_sl@champion")["version"]
        assert champion == (2 if v2["decision"]["passed"] else 1)
        deadline = time.monotonic() + 120
        while (serving := served_version()) != f"chat_sl:{champion}" and time.monotonic() < deadline:
            time.sleep(1)
        assert serving == f"chat_sl:{champion}", tail(server_log)
    finally:
        http.close()
        print(f"--- {server_log}:\n{tail(server_log)}\n--- {daemon_log}:\n{tail(daemon_log)}")  # shown on a failure
        for process in (daemon, server):
            if process is not None:
                stop(process)
