"""Every run config a user is shown is valid for the job it names: each file in examples/
(against the job its header's `dagster job execute -m crucible_jobs -j <job>` line names)
and each ```yaml block in README.md and docs/ (against the recipe its op names belong to; a
sweep spec as `crucible sweep run` checks it).
A renamed field or a misspelt choice in the docs fails here, not in a new user's hands.
Validation only (Dagster's own config check); the examples that train are run elsewhere.
The serving deployment examples (deploy/serving/: systemd, nginx, Kubernetes) are checked for
their wiring: each `crucible serve` line parses as the CLI parses it, and ports, probes,
variables and volumes agree."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from dagster import validate_run_config

from crucible_assets.sweeps.spec import parse
from crucible_jobs import defs
from crucible_jobs.sweeps import check

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("sweep_"))  # sweep specs: test_sweeps.py
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LINE = re.compile(r"dagster job execute -m crucible_jobs -j (\w+) -c (\S+)")


def example_job(path: Path) -> str:
    jobs = {job for job, file in RUN_LINE.findall(path.read_text()) if file.endswith(path.name)}
    assert len(jobs) == 1, f"{path.name}: its header must show the one command that runs it, found {jobs}"
    return jobs.pop()


def doc_blocks() -> list[tuple[str, dict]]:
    blocks = []
    for doc in DOCS:
        for i, text in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            blocks.append((f"{doc.relative_to(REPO)}#{i}", yaml.safe_load(text)))
    return blocks


def jobs_for(config: dict) -> list[str]:
    """The recipe a block's ops belong to; a resources-only block applies to any: sl_basic."""
    recipes = {op.split("__")[0] for op in config.get("ops", {})}
    return sorted(recipes) or ["sl_basic"]


def assert_valid(job: str, config: dict, where: str) -> None:
    try:
        validate_run_config(defs.resolve_job_def(job), config)
    except Exception as e:  # Dagster's config error lists every bad path
        pytest.fail(f"{where} is not a valid run config for job {job}: {e}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_its_job(path):
    assert_valid(example_job(path), yaml.safe_load(path.read_text()), f"examples/{path.name}")


@pytest.mark.parametrize("where,config", doc_blocks(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_yaml_block_is_valid_for_its_recipe(where, config):
    if "axes" in config:  # a sweep spec (docs/recipes.md#sweeps): checked as `crucible sweep run` checks it
        assert check(parse(config, where), where)
        return
    for job in jobs_for(config):
        assert_valid(job, config, where)


def test_every_example_and_doc_block_is_checked():
    assert len(EXAMPLES) >= 7 and len(doc_blocks()) >= 6


SERVING = REPO / "deploy" / "serving"


def read_by_our_code(name: str) -> bool:
    return any(name in p.read_text() for d in ("crucible_jobs", "crucible_assets", "resources") for p in (REPO / d).rglob("*.py"))


def test_serving_kubernetes_example_is_wired(tmp_path):
    """deploy/serving/serve.yaml: its objects parse and refer to each other, and the container
    runs a `crucible serve` line the CLI parses, on the port its probes, Service and scrape
    annotations name (no cluster here: the shape, not a rollout)."""
    from crucible_jobs.serving.server import API_KEY_VARIABLE
    from test_docs_commands import serve_call, serve_routes

    objects = {d["kind"]: d for d in yaml.safe_load_all((SERVING / "serve.yaml").read_text()) if d}
    assert sorted(objects) == ["Deployment", "PersistentVolumeClaim", "Service"]
    assert all(o["apiVersion"] and o["metadata"]["name"] for o in objects.values())
    claim, deployment, service = objects["PersistentVolumeClaim"], objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items() and service["spec"]["type"] == "ClusterIP"
    (container,) = pod["spec"]["containers"]

    assert container["command"][:2] == ["crucible", "serve"]
    call = serve_call(container["command"][2:], tmp_path)
    assert call["host"] == "0.0.0.0"  # the Service reaches it
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": call["port"]}

    def port(value) -> int:
        return ports[value] if isinstance(value, str) else value

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and "GET" in serve_routes()["/health"] and port(get["port"]) == call["port"], probe
    (exposed,) = service["spec"]["ports"]
    assert port(exposed["targetPort"]) == call["port"]
    scrape = pod["metadata"]["annotations"]
    assert scrape["prometheus.io/scrape"] == "true" and scrape["prometheus.io/path"] in serve_routes()
    assert int(scrape["prometheus.io/port"]) == call["port"]

    env = {e["name"]: e for e in container["env"]}
    assert all(read_by_our_code(name) for name in env if name != "HOME"), sorted(env)
    assert env[API_KEY_VARIABLE]["valueFrom"]["secretKeyRef"]["key"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    home = volumes[mounts[env["CRUCIBLE_HOME"]["value"]]]
    assert home["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # shared with the training pods (deploy/k8s)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"  # one response log


def systemd_unit(text: str) -> dict[str, dict[str, str]]:
    sections, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section[key.strip()] = value.strip()
    return sections


def test_serving_systemd_unit_is_wired(tmp_path, monkeypatch):
    """deploy/serving/crucible-serve.service: a `crucible serve` line the CLI parses, bound to
    127.0.0.1 on the port nginx.conf proxies to, as its own user, with an environment file
    whose template sets CRUCIBLE_HOME and the key; restarted on failure but not on exit 2,
    which is what `crucible serve` returns for a model the registry does not have."""
    from crucible_jobs import cli
    from crucible_jobs.serving.server import API_KEY_VARIABLE
    from test_docs_commands import serve_call

    unit = systemd_unit((SERVING / "crucible-serve.service").read_text())
    service = unit["Service"]
    program, subcommand, *argv = shlex.split(service["ExecStart"])
    assert Path(program).name == "crucible" and subcommand == "serve"
    call = serve_call(argv, tmp_path)
    assert call["host"] == "127.0.0.1"
    assert service["User"] not in ("", "root") and service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    template = dict(line.split("=", 1) for line in (SERVING / "serve.env.example").read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    assert {"CRUCIBLE_HOME", API_KEY_VARIABLE} <= set(template)
    commented = re.findall(r"^#(\w+)=", (SERVING / "serve.env.example").read_text(), re.M)
    assert all(read_by_our_code(name) for name in [*template, *commented])
    assert service["EnvironmentFile"].endswith("serve.env")
    assert template["CRUCIBLE_HOME"] in service["ReadWritePaths"].split()  # ProtectSystem=strict: it writes only there

    nginx = (SERVING / "nginx.conf").read_text()
    assert set(re.findall(r"proxy_pass http://([\d.]+:\d+)", nginx)) == {f"127.0.0.1:{call['port']}"}
    assert "proxy_buffering off" in nginx  # streamed answers pass token by token

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "empty"))
    assert cli.main(["serve", "chat_sl"]) == 2 and "2" in service["RestartPreventExitStatus"].split()
