"""Every command a user is shown runs as written: each line of every ```bash block in README.md
and docs/*.md (comments stripped, `\`-continued lines joined, `a && b` and `(a &)` taken apart) is matched to the check
that proves it, and a line no check claims fails here, so a new command in the docs has to
earn one. Per command:

- `dagster job execute -m crucible_jobs -j J [-c F]`: job J is in the Definitions, F exists and
  dagster takes the flags (F's validity for J is tests/test_docs_config.py's; training is the
  job tests');
- `dagster job launch`, `dagster sensor start`: run as written, from the repo root, against a
  scratch DAGSTER_HOME (the launch with deploy/dagster.yaml's run queue: the run is queued);
- `crucible ...`: run as written by the venv's console script against a store where a tiny
  sl_basic was trained and registered; exit status 0 and what the line promises;
  `crucible sweep run SPEC`: the spec passes the sweep's own check (sweeps run end to end in
  tests/test_sweeps.py); `crucible sweep report|register NAME`: NAME is a shipped spec's;
- `crucible serve MODEL ...`: the CLI itself parses the line (flags in `crucible serve --help`,
  their types and choices) with the server replaced, and MODEL names a recipe's model as a
  champion, an alias or a pinned version (serving itself: tests/test_serve_*.py);
- `curl URL ...`: every flag is curl's, URL is a route `crucible serve`'s app has, for the
  method the line uses, on a port a documented server listens on; a JSON body is one that
  route's request model accepts, naming a model a server serves; a key is the server's
  variable. docs/serving.md's ```python block runs as written against that app (in process,
  a tiny model under the served name);
- `dagster dev`, `dagster-daemon`, `mlflow`, `tensorboard`: installed in the venv, and the
  subcommand's `--help` lists every flag the line uses (a served UI: tests/test_quickstart.py;
  the tracking runs these commands find: tests/test_ui.py);
- `python -m bench[.scaling|.serving] ...`: the flags parse (the benchmark is not run);
- `pip install ... -c C -e '.[X]'`: C exists and X is an extra in pyproject.toml;
- `export`: each variable is read by our code, deploy/dagster.yaml or (MLFLOW_*) mlflow, and
  a `$(program ...)` it runs is installed;
- shell (`mkdir`, `cd`, `cp`, ...): the program exists, repo paths exist, and a drop folder
  is the one the sensor watches (the sensor itself: tests/test_automation.py)."""

import functools
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from unittest import mock
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN_CONFIG, env_with, run_job
from recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SOURCES = ["crucible_jobs", "crucible_assets", "resources", "recipes", "deploy"]


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every command in every ```bash block of the docs."""
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
            first = text[:block.start(1)].count("\n") + 1
            lines, i = block.group(1).splitlines(), 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):  # a command continued on the next line
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                i += 1
                for command in re.split(r"\s*&&\s*", re.sub(r"(^|\s+)#.*", "", line).strip()):
                    command = command.removeprefix("(").removesuffix(")").removesuffix("&").strip()
                    if command:
                        commands.append((f"{doc.relative_to(REPO)}:{first + start}", command))
    return commands


def dagster(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The venv's `dagster` from the repo root, as a user there runs it (workspace.yaml finds the code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CRUCIBLE_"))}
    env |= {"DAGSTER_HOME": str(home), "CRUCIBLE_HOME": str(home / "crucible")}
    return subprocess.run([str(VENV_BIN / "dagster"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@functools.cache
def help_text(*command: str) -> str:
    done = subprocess.run([str(VENV_BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"`{' '.join(command)} --help` failed: {done.stderr[-2000:]}"
    return done.stdout


def check_cli(m, tmp_path) -> None:
    """Installed in the venv; the subcommand exists and takes every flag the line passes."""
    exe, *args = shlex.split(m.group(0))
    assert (VENV_BIN / exe).is_file(), f"{exe} is not installed in {VENV_BIN} (pip install -e '.[test]')"
    subcommands = tuple(args[:next((i for i, a in enumerate(args) if a.startswith("-")), len(args))])
    text = help_text(exe, *subcommands)
    for flag in (a for a in args if a.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"`{exe} {' '.join(subcommands)}` has no {flag}"


def check_job_execute(m, tmp_path) -> None:
    from crucible_jobs import defs

    assert m["job"] in {job.name for job in defs.resolve_all_job_defs()}, f"no job {m['job']}"
    assert m["file"] is None or (REPO / m["file"]).is_file(), f"{m['file']} does not exist"
    check_cli(m, tmp_path)


def check_job_launch(m, tmp_path) -> None:
    """deploy/dagster.yaml's run queue on SQLite (its PostgreSQL: tests/test_postgres_instance.py)."""
    from dagster import DagsterInstance, DagsterRunStatus

    instance = {k: v for k, v in yaml.safe_load((REPO / "deploy/dagster.yaml").read_text()).items() if k != "storage"}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    done = dagster(*shlex.split(m.group(0))[1:], home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with DagsterInstance.from_config(str(tmp_path)) as dagster_instance:
        assert [(r.job_name, r.status) for r in dagster_instance.get_runs()] == [(m["job"], DagsterRunStatus.QUEUED)]


def check_sensor_start(m, tmp_path) -> None:
    (tmp_path / "dagster.yaml").touch()
    done = dagster(*shlex.split(m.group(0))[1:], home=tmp_path)
    assert done.returncode == 0 and f"Started sensor {m['sensor']}" in done.stdout, done.stderr[-3000:]


def check_bench(m, tmp_path) -> None:
    argv = shlex.split(m["args"])
    done = subprocess.run([sys.executable, "-m", m["module"], *argv, "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and f"usage: python -m {m['module']}" in done.stdout, done.stderr[-2000:]
    if m["module"] == "bench":
        from bench.__main__ import parse

        parse(argv)  # and the row names exist (argparse's --help stops before that check)


def check_pip_install(m, tmp_path) -> None:
    assert (REPO / m["constraints"]).is_file(), f"no {m['constraints']}"
    assert m["extra"] in PYPROJECT["project"]["optional-dependencies"], f"pyproject.toml has no extra [{m['extra']}]"


def check_venv(m, tmp_path) -> None:
    from packaging.specifiers import SpecifierSet

    assert platform.python_version() in SpecifierSet(PYPROJECT["project"]["requires-python"])


def check_export(m, tmp_path) -> None:
    import mlflow.environment_variables

    source = "".join(p.read_text() for d in SOURCES for p in (REPO / d).rglob("*") if p.suffix in (".py", ".yaml"))
    for name in re.findall(r"(\w+)=", m["assignments"]):
        read = hasattr(mlflow.environment_variables, name) if name.startswith("MLFLOW_") else name in source
        assert read, f"{name} is read by none of {SOURCES}" + (" (nor mlflow)" if name.startswith("MLFLOW_") else "")
    for program in re.findall(r"\$\((\S+)", m["assignments"]):
        assert shutil.which(program), f"{program} is not installed"


def check_shell(m, tmp_path) -> None:
    from crucible_jobs.sensors import drop_folder

    program, *args = shlex.split(m.group(0))
    assert program in ("cd", "source") or shutil.which(program), f"{program} is not installed"
    for arg in args:
        if arg.startswith("$CRUCIBLE_HOME/drop/"):
            with pytest.MonkeyPatch.context() as env:
                env.setenv("CRUCIBLE_HOME", str(tmp_path))
                env.delenv("CRUCIBLE_DROP_DIR", raising=False)
                folder = drop_folder() / arg.split("/")[2]
                assert Path(os.path.expandvars(arg)) == folder, f"{arg} is not the folder the sensor watches"
        elif "/" in arg and not arg.startswith(("$", "~", "-")):
            assert (REPO / arg).exists(), f"{arg} does not exist in the repo"


def check_sweep(m, _tmp) -> None:
    """A sweep spec the docs run is valid as `crucible sweep run` checks it (tests/test_sweeps.py
    runs sweeps end to end on a tiny model); a report the docs print is of a spec they ship."""
    from crucible_jobs.sweeps import check, read_spec

    if m["action"] == "run":  # on another code location (--module) with its executor's config (-c) where the line says so
        module = re.search(r"--module (\S+)", m["flags"])
        extra = {}
        for config in re.findall(r"-c (\S+)", m["flags"]):
            extra |= yaml.safe_load((REPO / config).read_text())
        exported = {k: v for _, c in COMMANDS if c.startswith("export ") for k, v in re.findall(r"(\w+)=(\S+)", c)}
        with mock.patch.dict(os.environ, exported):  # as the docs' shell has them (the broker's URL)
            assert check(read_spec(m["arg"]), m["arg"], module[1] if module else "crucible_jobs", extra)
    else:
        assert m["arg"] in {read_spec(str(p)).name for p in (REPO / "examples").glob("sweep_*.yaml")}


def serve_call(argv: list[str], tmp_path: Path) -> dict:
    """What `crucible serve ARGV` starts, as the CLI itself parses it (types, choices, defaults),
    with the server replaced: {"spec", "host", "port", "precision", "threads", ...}."""
    from crucible_jobs import cli

    with mock.patch("crucible_jobs.serving.server.serve") as serve, \
            mock.patch.dict(os.environ, {"CRUCIBLE_HOME": str(tmp_path / "serve_home")}):
        try:
            assert cli.main(["serve", *argv]) == 0
        except SystemExit as e:
            pytest.fail(f"`crucible serve {shlex.join(argv)}` does not parse (exit {e.code})")
    (spec, host, port), settings = serve.call_args
    form = re.fullmatch(r"(\w+)(?:@(\w+)|:(\d+))?", spec)
    assert form, f"{spec!r} is not a model (chat_sl), an alias (chat_sl@staging) or a version (chat_sl:3)"
    name, alias, _version = form.groups()
    assert name in {r.name for r in RECIPES}, f"{spec}: no recipe registers a model {name!r}"
    assert alias in (None, "latest", "staging", "champion"), f"{spec}: the registry has no alias {alias!r}"
    return {"spec": spec, "host": host, "port": port, **settings}


def check_serve(m, tmp_path) -> None:
    argv = shlex.split(m["args"])
    help = help_text("crucible", "serve")
    for flag in (a for a in argv if a.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help), f"`crucible serve` has no {flag}"
    serve_call(argv, tmp_path)


@functools.cache
def serve_routes() -> dict[str, set[str]]:
    """path -> methods of `crucible serve`'s app (crucible_jobs/serving/app.py create_app)."""
    from fastapi.routing import APIRoute

    from crucible_jobs.serving.app import Served, create_app

    app = create_app(Served(name="chat_sl", spec="chat_sl", engine=mock.Mock(), responses=mock.Mock()))
    return {r.path: r.methods for r in app.routes if isinstance(r, APIRoute)}


def serve_ports(tmp_path: Path) -> set[int]:
    """The ports the docs' servers listen on: --port's default and every --port a line passes."""
    ports = {int(p) for _, c in COMMANDS if c.startswith("crucible serve ") for p in re.findall(r"--port (\d+)", c)}
    return ports | {serve_call([RECIPES[0].name], tmp_path)["port"]}


CURL_VALUE_FLAGS = {"-H", "--header", "-d", "--data", "--data-raw", "--data-binary", "-X", "--request", "-o", "--output",
                    "-w", "--write-out"}
REQUEST_BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
                  "/v1/feedback": "FeedbackRequest"}


def check_curl(m, tmp_path) -> None:
    from urllib.parse import urlsplit

    from crucible_jobs.serving import protocol, server

    assert shutil.which("curl"), "curl is not installed"
    manual = help_text_of(("curl", "--help", "all"))
    args, urls, headers, data, method = shlex.split(m.group(0))[1:], [], [], None, None
    while args:
        arg = args.pop(0)
        if not arg.startswith("-"):
            urls.append(arg)
            continue
        flags = [arg] if arg.startswith("--") else [f"-{c}" for c in arg[1:]]
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", manual), f"curl has no {flag}"
        if flags[-1] in CURL_VALUE_FLAGS:
            value = args.pop(0)
            if flags[-1] in ("-H", "--header"):
                headers.append(value)
            elif flags[-1] in ("-X", "--request"):
                method = value
            elif flags[-1].startswith(("-d", "--data")):
                data = value
    (url,) = urls
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1", f"{url}: not a local `crucible serve`"
    assert parts.port in serve_ports(tmp_path), f"{url}: no server in the docs listens on port {parts.port}"
    method = method or ("POST" if data is not None else "GET")
    routes = serve_routes()
    assert parts.path in routes, f"{url}: `crucible serve` has no {parts.path} (it has {sorted(routes)})"
    assert method in routes[parts.path], f"{url}: {parts.path} takes {sorted(routes[parts.path])}, not {method}"
    if data is not None:
        try:
            body = protocol.parse(getattr(protocol, REQUEST_BODIES[parts.path]), data.encode())
        except protocol.OpenAIError as e:
            pytest.fail(f"{parts.path} refuses this body: {e.status} {e.message}")
        if hasattr(body, "model"):
            serve_call([body.model], tmp_path)  # a model a server can serve, named as its clients name it
    for header in headers:
        name, _, value = header.partition(": ")
        if name.lower() == "authorization":
            assert value == f"Bearer ${server.API_KEY_VARIABLE}", f"the key is ${server.API_KEY_VARIABLE}, sent as a bearer token"


@functools.cache
def help_text_of(argv: tuple[str, ...]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"`{' '.join(argv)}` failed: {done.stderr[-2000:]}"
    return done.stdout


CRUCIBLE_SHOWS = {  # what each `crucible` subcommand's output must contain, after the run below
    "models": ["sl_basic", "v1", "champion,latest"],
    "lineage": ["sl_basic/registered_model", "sl_basic/dataset  data_version="],
    "audit": ["OK     sl_basic/dataset", "audit passed"],
}

CHECKS = [  # (pattern, check): the first pattern that matches a whole command checks it
    (r"dagster job execute -m crucible_jobs -j (?P<job>\w+)(?: -c (?P<file>\S+))?", check_job_execute),
    (r"dagster job launch -j (?P<job>\w+)", check_job_launch),
    (r"dagster sensor start (?P<sensor>\w+)", check_sensor_start),
    (r"(dagster|dagster-daemon|dagster-celery|mlflow|tensorboard)( .*)?", check_cli),
    (r"crucible sweep (?P<action>run|report|register) (?P<arg>\S+)(?P<flags>( --launch| --json| --parallel \d+| --module \S+| -c \S+)*)",
     check_sweep),
    (r"crucible serve (?P<args>.*)", check_serve),
    (r"crucible (?P<sub>\w+).*", None),  # run together in test_crucible_commands_run_against_a_registered_model
    (r"curl (?P<args>.*)", check_curl),
    (r"(\.venv/bin/)?python3? -m (?P<module>bench(\.scaling|\.serving)?)(?P<args>.*)", check_bench),
    (r"\.venv/bin/python -m pytest -q", None),  # this very suite
    (r"(\.venv/bin/)?pip install -q -c (?P<constraints>\S+) -e '\.\[(?P<extra>\w+)\]'", check_pip_install),
    (r"python3 -m venv \.venv", check_venv),
    (r"export (?P<assignments>.*)", check_export),
    (r"(source|mkdir|touch|cd|cp|mv) .*", check_shell),
]
COMMANDS = doc_commands()


def classify(where: str, command: str):
    for pattern, check in CHECKS:
        if m := re.fullmatch(pattern, command):
            return m, check
    pytest.fail(f"{where}: no check for `{command}`; add one to CHECKS in {Path(__file__).name}")


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w} {c}" for w, c in COMMANDS])
def test_doc_command(where, command, tmp_path):
    m, check = classify(where, command)
    if check:
        check(m, tmp_path)


def test_crucible_commands_run_against_a_registered_model(homes):
    assert run_job("sl_basic", TINY_RUN_CONFIG).success
    lines = [(where, c) for where, c in COMMANDS if c.startswith("crucible ") and not c.startswith(("crucible sweep ", "crucible serve "))]
    for where, command in lines:
        sub = command.split()[1]
        assert sub in CRUCIBLE_SHOWS, f"{where}: say in CRUCIBLE_SHOWS what `{command}` must print"
        done = subprocess.run(["bash", "-c", command], env=env_with(PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}: {done.stderr[-3000:]}"
        for shown in CRUCIBLE_SHOWS[sub]:
            assert shown in done.stdout, f"{where}: `{command}` did not print {shown!r}:\n{done.stdout[-3000:]}"
    assert {c.split()[1] for _, c in lines} == set(CRUCIBLE_SHOWS)


def test_every_bash_block_is_read():
    fences = {lang for doc in DOCS for lang in re.findall(r"^[ \t]*```(\S*)", doc.read_text(), re.M)}
    assert fences <= {"bash", "yaml", "python", ""}, f"a block these tests do not read: {fences}"
    assert len(COMMANDS) >= 30


def test_serving_python_block_runs_against_the_server(tiny, tmp_path, monkeypatch, capsys):
    """docs/serving.md's openai client code, as written, against `crucible serve`'s own app with
    a key set: a tiny model under the served name and version, HTTP in process (the client's
    transport is the app). Its chat, stream and feedback calls succeed, and the feedback lands
    in the feedback folder as the record the feedback job reads."""
    import openai
    import torch
    from starlette.testclient import TestClient

    from crucible_assets.feedback import load_feedback
    from crucible_jobs.serving.app import Served, create_app
    from crucible_jobs.serving.engine import BatchingEngine, LoadedModel
    from crucible_jobs.serving.responses import ResponseLog
    from crucible_jobs.serving.server import API_KEY_VARIABLE
    from resources.hf_io import load_model, load_tokenizer

    (block,) = re.findall(r"^```python\n(.*?)^```", (REPO / "docs" / "serving.md").read_text(), re.S | re.M)
    tokenizer, model = load_tokenizer(tiny), load_model(tiny).eval()
    # Untrained, its greedy answer is blank, and a blank answer cannot be rated: it writes no blanks
    blank = torch.tensor([i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()])
    model.get_output_embeddings().register_forward_hook(lambda _module, _args, logits: logits.index_fill(-1, blank, float("-inf")))
    engine = BatchingEngine(LoadedModel(model, tokenizer, "chat_sl:1", 256, [tokenizer.eos_token_id]), max_rows=8,
                            default_max_tokens=16)
    monkeypatch.setenv(API_KEY_VARIABLE, "a-doc-key")
    monkeypatch.setenv("CRUCIBLE_FEEDBACK_DIR", str(tmp_path / "feedback"))
    app = create_app(Served(name="chat_sl", spec="chat_sl", engine=engine, responses=ResponseLog(tmp_path / "responses.sqlite"),
                            api_key="a-doc-key"))
    with TestClient(app) as http:
        class InProcess(openai.OpenAI):
            def __init__(self, **kwargs):
                assert kwargs["base_url"] == "http://127.0.0.1:8000/v1" and 8000 in serve_ports(tmp_path)
                super().__init__(**kwargs, http_client=http)

        monkeypatch.setattr(openai, "OpenAI", InProcess)
        exec(compile(block, "docs/serving.md", "exec"), {"__name__": "docs_serving"})
    assert "chat_sl:1 chat_sl:1" in capsys.readouterr().out  # system_fingerprint and model_version
    (record,) = load_feedback(tmp_path / "feedback")
    assert record["model_version"] == "chat_sl:1" and record["rating"] == 5 and record["edited_response"] is None
    assert record["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
