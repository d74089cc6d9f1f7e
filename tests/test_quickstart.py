"""The Quickstart as a new user follows it: the README's own set-up lines, then `dagster dev`
in that shell, reaches a served UI whose code location loaded, and Ctrl-C stops it with its
children. (Exporting DAGSTER_MODULE_NAME there once made `dagster dev` hang with no port
open and deaf to Ctrl-C: its webserver child refused the variable beside `--workspace`.)
The shell runs in a scratch copy of the repo root's workspace files so the user's own
.dagster_home is left alone; the port is a free one instead of 3000."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import RECIPE_GROUPS, SCREENSHOTS, body_text, browser, dismiss_newsletter, wait_for  # noqa: F401
from local_services import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[1]
READY_WITHIN_S = 240  # a start-up deadline (two busy cores import torch-free Definitions), not a timing assertion
STOPPED_WITHIN_S = 60
LOCATION_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }"

pytestmark = pytest.mark.slow


def quickstart_block() -> list[str]:
    """The README's bash block that activates the venv and runs the main job, line by line."""
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "source .venv/bin/activate" in b]
    assert blocks, "the README lost its Quickstart block"
    return blocks[0].splitlines()


def quickstart_setup() -> str:
    """The block as a shell runs it, up to the job: activating the venv is done by PATH here,
    and the job itself (75 s of training) is not what this test is about."""
    return "\n".join(line for line in quickstart_block()
                     if not line.startswith(("source ", "dagster job execute")))


def test_readme_exports_leave_dagster_dev_its_own_code_location():
    exports = [line for line in quickstart_block() if line.startswith("export ")]
    assert len(exports) == 1 and "DAGSTER_MODULE_NAME" not in exports[0]
    assert any(line.startswith("dagster job execute -m crucible_jobs -j ") for line in quickstart_block())


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_dagster_dev_in_the_quickstart_shell_serves_the_ui_and_stops_on_ctrl_c(tmp_path, browser):
    for name in ("workspace.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    port = free_port()
    script = f"set -e\n{quickstart_setup()}\nexec dagster dev -p {port}\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `source .venv/bin/activate`
    log = tmp_path / "dagster_dev.log"
    with log.open("w") as out:
        # a terminal's shell: Ctrl-C's default action, even when pytest itself runs as a background
        # job (which starts with SIGINT ignored, inherited through exec, and dagster dev would never hear it)
        proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(proc, f"{url}/server_info", log, READY_WITHIN_S)
        entries = graphql(url, LOCATION_QUERY)["data"]["workspaceOrError"]["locationEntries"]
        assert [(e["name"], e["locationOrLoadError"]["__typename"]) for e in entries] == [("crucible_jobs", "RepositoryLocation")]
        assert (tmp_path / ".dagster_home" / "dagster.yaml").is_file()  # the README's DAGSTER_HOME, under the shell's $PWD
        assert "No dagster instance configuration file" not in log.read_text()
        browser.get(f"{url}/asset-groups")  # what step 2 of the Quickstart tells a user to look at
        wait_for(browser, lambda d: all(g in body_text(d).split("\n") for g in RECIPE_GROUPS), "every recipe group")
        dismiss_newsletter(browser)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "0_quickstart_dagster_dev.png"))

        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches `dagster dev` (exec'd: the shell's own pid)
        try:
            proc.wait(timeout=STOPPED_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dagster dev still running {STOPPED_WITHIN_S} s after Ctrl-C; its log ends:\n{log.read_text()[-3000:]}")
        deadline = time.time() + STOPPED_WITHIN_S
        while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout and time.time() < deadline:
            time.sleep(1)  # the webserver, daemon and code server leave after their parent
        assert not subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout, "children outlived Ctrl-C"
    finally:
        if proc.poll() is None or subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout:
            os.killpg(proc.pid, signal.SIGKILL)
