"""The Dagster UI and the tracking sinks, end to end: one tiny sl_basic run with MLflow and
TensorBoard turned on, then `dagster-webserver` on 127.0.0.1 over the same homes. A GraphQL
client launches the recipe job and polls it to success; headless Chromium opens the asset
graph and a checkpoint page (groups, metadata, the loss-curve image, the Plots tab) and saves
screenshots; the `mlflow` CLI lists the run with its metrics."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN_CONFIG, config_for, env_with, run_job
from browser import RECIPE_GROUPS, SCREENSHOTS, body_text, browser, click, click_text, dismiss_newsletter, wait_for  # noqa: F401
from local_services import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[1]
# the webserver launches runs itself: no daemon here to dequeue them
RUN_AT_ONCE = "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
READY_WITHIN_S = 240  # a start-up deadline (imports torch on two busy cores), not a timing assertion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def homes_after_run(tmp_path_factory):
    """CRUCIBLE_HOME and DAGSTER_HOME after one tiny sl_basic run with both tracking sinks on."""
    root = tmp_path_factory.mktemp("ui")
    crucible, dagster = root / "crucible", root / "dagster"
    dagster.mkdir()
    (dagster / "dagster.yaml").write_text(RUN_AT_ONCE)
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["resources"] = {**config["resources"], "tracking": {"config": {"mlflow": True, "tensorboard": True}}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRUCIBLE_HOME", str(crucible))
        env.setenv("DAGSTER_HOME", str(dagster))
        assert run_job("sl_basic", config).success
        yield crucible, dagster


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket listening on `port`, from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


@pytest.fixture(scope="module")
def webserver(homes_after_run, tmp_path_factory):
    crucible, dagster = homes_after_run
    port = free_port()
    log = tmp_path_factory.mktemp("webserver") / "webserver.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
                                 "-m", "crucible_jobs"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env_with(CRUCIBLE_HOME=str(crucible), DAGSTER_HOME=str(dagster)), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(proc, f"{url}/server_info", log, READY_WITHIN_S)
        yield port, url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_webserver_listens_on_loopback_only(webserver):
    port, _ = webserver
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex; no 0.0.0.0, no ::


def test_graphql_client_launches_a_recipe_job_and_it_succeeds(webserver):
    from dagster import DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient

    port, _ = webserver
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    # twenty more steps: a new checkpoint, so the Plots tab charts two different materializations,
    # and a better one, so it passes the promotion gate (beats_champion) and the run succeeds
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["sl_basic__checkpoint"]["config"]["max_steps"] = 60
    run_id = client.submit_job_execution("sl_basic", run_config=config_for("sl_basic", config))
    finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    deadline = time.time() + 300
    while (status := client.get_run_status(run_id)) not in finished:
        assert time.time() < deadline, f"run {run_id} still {status}"
        time.sleep(2)
    assert status == DagsterRunStatus.SUCCESS


def test_browser_shows_recipe_groups_checkpoint_metadata_and_plots(webserver, browser, capsys):
    from selenium.webdriver.common.by import By

    _, url = webserver
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nUI screenshots: {SCREENSHOTS}")

    browser.get(f"{url}/asset-groups")  # global lineage: one collapsed group per recipe
    wait_for(browser, lambda d: all(g in body_text(d).split("\n") for g in RECIPE_GROUPS), "every recipe group")
    dismiss_newsletter(browser)
    browser.save_screenshot(str(SCREENSHOTS / "1_recipe_groups.png"))

    browser.get(f"{url}/locations/crucible_jobs/asset-groups/sl_basic")  # one recipe's asset graph
    stages = ["base_model", "dataset", "tokenized", "checkpoint", "eval_report", "champion_eval", "registered_model"]
    wait_for(browser, lambda d: all(s in body_text(d).split("\n") for s in stages), "sl_basic's stages in its graph")
    dismiss_newsletter(browser)
    time.sleep(1)  # let the graph finish its layout animation before the picture
    browser.save_screenshot(str(SCREENSHOTS / "2_sl_basic_graph.png"))

    browser.get(f"{url}/assets/sl_basic/checkpoint")
    wait_for(browser, lambda d: "train_mean_nll" in body_text(d), "the checkpoint's metadata")
    dismiss_newsletter(browser)
    text = body_text(browser)
    for shown in ("code_version", "metrics_file", "model_dir", "tokens_per_second", "test/nll", "post-training", "PyTorch", "Hugging Face",
                  "The fine-tuned model"):
        assert shown in text, f"{shown!r} missing from the checkpoint page"
    browser.save_screenshot(str(SCREENSHOTS / "3_checkpoint_metadata.png"))

    click_text(browser, "Show Markdown", "the loss_curve markdown")
    # the dialog fades in: the image is in the page (decoded) a moment before it is displayed
    image = wait_for(browser, lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")
                                         if int(i.get_attribute("naturalWidth") or 0) > 0 and i.is_displayed()],
                     "the loss-curve PNG, displayed")[0]
    assert image.get_attribute("alt") == "loss_curve.png" and image.size["width"] > 300
    browser.save_screenshot(str(SCREENSHOTS / "4_checkpoint_loss_curve.png"))
    click_text(browser, "Close", "the dialog's Close button")

    click(browser, lambda d: [b for b in d.find_elements(By.XPATH, "//button[normalize-space()='Plots']") if b.is_displayed()],
          "the Plots tab")
    plot = wait_for(browser, lambda d: d.find_elements(By.XPATH, "//*[normalize-space()='train_mean_nll']"),
                    "the train_mean_nll plot")[0]
    canvases = wait_for(browser, lambda d: d.find_elements(By.TAG_NAME, "canvas"), "a chart canvas")
    assert any(c.size["width"] > 100 and c.size["height"] > 50 for c in canvases)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", plot)
    time.sleep(1)
    browser.save_screenshot(str(SCREENSHOTS / "5_checkpoint_plots.png"))

    browser.get(f"{url}/assets/sl_basic/eval_report")
    table = wait_for(browser, lambda d: d.find_elements(By.XPATH, "//tr[.//td[normalize-space()='eval_table']]//table"),
                     "the eval report's comparison table")[0]
    rows = table.text.splitlines()
    assert rows[0].split() == ["metric", "start", "trained", "trained_ci", "gain", "gain_ci", "verdict"]
    assert any(r.startswith("test/nll ") for r in rows) and any(r.startswith("test/accuracy ") for r in rows)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'nearest'});", table)
    browser.save_screenshot(str(SCREENSHOTS / "6_eval_table.png"))

    browser.get(f"{url}/assets/sl_basic/eval_robustness")
    table = wait_for(browser, lambda d: d.find_elements(By.XPATH, "//tr[.//td[normalize-space()='eval_table']]//table"),
                     "the robustness suite's table")[0]
    assert any(r.startswith("robustness/numbers_as_words/drop ") for r in table.text.splitlines())
    browser.save_screenshot(str(SCREENSHOTS / "7_eval_robustness.png"))

    browser.get(f"{url}/assets/sl_basic/eval_attribution")
    wait_for(browser, lambda d: "attribution/worst_completeness_gap" in body_text(d), "the attribution suite's metadata")
    click_text(browser, "Show Markdown", "the attribution heat map's markdown")
    heatmap = wait_for(browser, lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")
                                           if int(i.get_attribute("naturalWidth") or 0) > 0 and i.is_displayed()],
                       "the attribution heat map, displayed")[0]
    assert heatmap.get_attribute("alt") == "attribution.png" and heatmap.size["width"] > 300
    time.sleep(1)
    browser.save_screenshot(str(SCREENSHOTS / "8_eval_attribution.png"))


def mlflow_cli(crucible: Path, *args: str) -> str:
    mlflow = Path(sys.executable).with_name("mlflow")
    done = subprocess.run([str(mlflow), *args], capture_output=True, text=True, timeout=300,
                          env=env_with(MLFLOW_TRACKING_URI=(crucible / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_mlflow_lists_the_run_with_its_metrics_and_tensorboard_has_the_scalars(homes_after_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    crucible, _ = homes_after_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(crucible / "mlruns").as_uri())
    experiment_id = client.get_experiment_by_name("crucible").experiment_id
    runs = [line for line in mlflow_cli(crucible, "runs", "list", "--experiment-id", experiment_id).splitlines()
            if "sl_basic/checkpoint@" in line]
    assert len(runs) == 1
    run = json.loads(mlflow_cli(crucible, "runs", "describe", "--run-id", runs[0].split()[-1]))
    metrics, params, tags = run["data"]["metrics"], run["data"]["params"], run["data"]["tags"]
    assert {"train_mean_nll", "test/nll", "learning_rate", "grad_norm"} <= set(metrics)
    assert params["max_steps"] == "40" and params["learning_rate"] == "0.001"
    assert tags["crucible.registry_version"] == "sl_basic:1"
    assert tags["crucible.asset_key"] == "sl_basic/checkpoint"

    history = client.get_metric_history(run["info"]["run_id"], "train_mean_nll")
    assert sorted(m.step for m in history) == list(range(40))  # per step, not just the last value
    files = {Path(f.path).name for f in client.list_artifacts(run["info"]["run_id"], "checkpoint/model")}
    assert "model.safetensors" in files

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = (crucible / "tensorboard" / "sl_basic" / "checkpoint").iterdir()
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert [s.step for s in events.Scalars("train_mean_nll")] == list(range(40))
