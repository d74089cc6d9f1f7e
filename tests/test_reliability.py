"""Reliability and security: bad input, integrity, hostile names and files, secrets, faults.

One good sl_basic run (plus math_rl's cheap stages) populates a store; every bad input and
absurd config then goes through the real Dagster job and must fail naming file, record and
field while the store and the registry stay byte-for-byte unchanged. The SIGKILL campaign
(`slow`) lives in fault_worker.py. tests/RELIABILITY.md tabulates what is covered here.
"""

from __future__ import annotations

import copy
import errno
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dagster import AssetKey

from conftest import TINY_RUN_CONFIG, config_for, skip_or_fail_under_ci, tree_digest
from resources.store.artifact_store import ArtifactRef, ArtifactStore, IntegrityError, atomic_write_text
from resources.datasets.sources import DatasetError, load_records
from resources.store.registry import ModelRegistry

CORPUS = Path(__file__).parent / "bad_inputs"
SECRETS = {"TINKER_API_KEY": "tml-SECRET-" + uuid.uuid4().hex, "HF_TOKEN": "hf_SECRET" + uuid.uuid4().hex}


def recipe_loader(recipe: str):
    """The recipe's own dataset config class and record validator, as its job uses them."""
    import recipes.chat_sl, recipes.distillation, recipes.dpo, recipes.math_rl, recipes.sl_basic  # noqa: E401
    from resources.datasets.sources import validate_record
    from resources.datasets.pairs import validate_pair
    from resources.datasets.problems import validate_problem

    return {
        "sl_basic": (recipes.sl_basic.SlBasicDataset, validate_record),
        "chat_sl": (recipes.chat_sl.ChatSlDataset, validate_record),
        "dpo": (recipes.dpo.DpoDataset, validate_pair),
        "math_rl": (recipes.math_rl.MathRlDataset, validate_problem),
        "distillation": (recipes.distillation.DistillDataset, validate_problem),
    }[recipe]


RECIPES = ["sl_basic", "chat_sl", "dpo", "math_rl", "distillation"]
# (file, what the message must say besides the file's path); same for every recipe
FILE_CASES = [
    ("empty.jsonl", ["no records"]),
    ("blank_lines.jsonl", ["no records"]),
    ("malformed_json.jsonl", ["line 2", "malformed JSON"]),
    ("truncated.jsonl", ["line 2", "malformed JSON"]),
    ("non_utf8.jsonl", ["line 2", "not UTF-8"]),
    ("not_an_object.jsonl", ["line 2", "expected a JSON object"]),
    ("corrupt.parquet", ["unreadable Parquet"]),
    ("missing.jsonl", ["no such file"]),
    ("huge_line.jsonl", ["line 1", "longer than 16 MiB"]),  # 50 MB, made at test time
]
CONVERSATIONS, PAIRS, PROBLEMS = ("sl_basic", "chat_sl"), ("dpo",), ("math_rl", "distillation")
# (recipes, file, record, field, problem)
RECORD_CASES = [
    (CONVERSATIONS, "conv_wrong_type.jsonl", "line 3", "messages[0].content", "got int"),
    (CONVERSATIONS, "conv_missing_field.jsonl", "line 2", "messages[1].role", "missing"),
    (CONVERSATIONS, "conv_unknown_role.jsonl", "line 1", "messages[0].role", "unknown role 'wizard'"),
    (CONVERSATIONS, "conv_nan_content.jsonl", "line 2", "messages[0].content", "got float"),
    (CONVERSATIONS, "conv_no_assistant.jsonl", "line 2", "messages", "no non-empty assistant message"),
    (CONVERSATIONS, "conv_messages_not_list.jsonl", "line 1", "messages", "expected a non-empty list"),
    (PAIRS, "pairs_identical.jsonl", "line 2", "rejected", "identical to the chosen"),
    (PAIRS, "pairs_missing_rejected.jsonl", "line 2", "rejected", "missing"),
    (PAIRS, "pairs_wrong_type.jsonl", "line 1", "chosen", "expected a non-empty list"),
    (PAIRS, "pairs_unknown_role.jsonl", "line 1", "rejected[0].role", "unknown role 'robot'"),
    (PAIRS, "pairs_nan_preference.jsonl", "line 1", "overall_preference", "got float"),
    (PAIRS, "pairs_inf_preference.jsonl", "line 1", "overall_preference", "got float"),
    (PAIRS, "pairs_hh_bad_transcript.jsonl", "line 1", "chosen", "must start with"),
    (PAIRS, "pairs_prompt_differs.jsonl", "line 1", "rejected", "prompt (every message before the last) differs"),
    (PROBLEMS, "problems_missing_answer.jsonl", "line 2", "answer", "missing"),
    (PROBLEMS, "problems_wrong_type.jsonl", "line 2", "question", "non-empty string"),
    (PROBLEMS, "problems_nan_answer.jsonl", "line 2", "answer", "finite number, got nan"),
    (PROBLEMS, "problems_inf_answer.jsonl", "line 1", "answer", "finite number, got inf"),
    (PROBLEMS, "problems_bool_answer.jsonl", "line 1", "answer", "got bool"),
    (PROBLEMS, "problems_math_no_boxed.jsonl", "line 1", "solution", "no \\boxed{}"),
]


@pytest.fixture(scope="session")
def huge_line(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge_line.jsonl"
    with open(path, "w") as f:
        f.write('{"messages": [{"role": "user", "content": "')
        f.write("a" * (50 << 20))
        f.write('"}, {"role": "assistant", "content": "b"}]}\n')
    return path


def corpus_file(name: str, huge_line: Path) -> Path:
    return huge_line if name == "huge_line.jsonl" else CORPUS / name


def dataset_config(path: Path) -> dict:
    return {"source": "parquet" if path.suffix == ".parquet" else "jsonl", "path": str(path)}


def file_expectations(name: str, path: Path) -> list[str]:
    return [str(path), *dict(FILE_CASES)[name]]


def record_expectations(case) -> tuple[str, list[str]]:
    _, name, record, field, problem = case
    return name, [str(CORPUS / name), f"{record}: field {field!r}", problem]


# -- the loaders, directly ---------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", [n for n, _ in FILE_CASES])
def test_file_faults_name_the_file_and_record(recipe, name, huge_line):
    cls, validate = recipe_loader(recipe)
    path = corpus_file(name, huge_line)
    with pytest.raises(DatasetError) as err:
        load_records(cls(**dataset_config(path)), validate)
    for part in file_expectations(name, path):
        assert part in str(err.value), f"{recipe}: {name}: {err.value}"


@pytest.mark.parametrize("recipe,case", [(r, c) for c in RECORD_CASES for r in c[0]],
                         ids=lambda v: v if isinstance(v, str) else v[1])
def test_record_faults_name_file_record_and_field(recipe, case):
    cls, validate = recipe_loader(recipe)
    name, expected = record_expectations(case)
    with pytest.raises(DatasetError) as err:
        load_records(cls(**dataset_config(CORPUS / name)), validate)
    for part in expected:
        assert part in str(err.value), f"{recipe}: {name}: {err.value}"


def test_reliability_md_counts_what_the_tests_run():
    """The counts RELIABILITY.md quotes come from these parametrizations, so they cannot drift."""
    loader_files, loader_records = len(FILE_CASES) * len(RECIPES), sum(len(c[0]) for c in RECORD_CASES)
    runs = loader_records + len(FILE_CASES)  # every record case through its recipes, every file case through sl_basic
    doc = (Path(__file__).parent / "RELIABILITY.md").read_text()
    assert f"{loader_files} file-level and {loader_records} record-level loader cases; {runs} Dagster runs" in doc


def test_every_corpus_file_is_exercised():
    used = {n for n, _ in FILE_CASES} | {c[1] for c in RECORD_CASES}
    assert {p.name for p in CORPUS.iterdir() if p.name != "README.md"} <= used


@pytest.mark.parametrize("recipe,field,value,problem", [
    ("sl_basic", "learning_rate", -1e-3, "greater than 0"),
    ("sl_basic", "learning_rate", float("nan"), "a finite number"),
    ("chat_sl", "batch_size", 0, "greater than 0"),
    ("dpo", "beta", 0.0, "greater than 0"),
    ("dpo", "batch_size", 0, "greater than 0"),
    ("math_rl", "group_size", 1, "greater than or equal to 2"),
    ("math_rl", "learning_rate", float("inf"), "a finite number"),
    ("distillation", "group_size", 0, "greater than 0"),
    ("distillation", "save_every", 0, "greater than 0"),
])
def test_absurd_training_config_is_refused(recipe, field, value, problem):
    """A field's own range is its type's, so a recipe's config class refuses the value itself."""
    import importlib

    from pydantic import ValidationError

    cls = importlib.import_module(f"recipes.{recipe}").RECIPE.train
    with pytest.raises(ValidationError, match=f"{cls.__name__}\n{field}\n  Input should be {problem}"):
        cls(**{field: value})


# -- through the real jobs, on a populated store ----------------------------------------------


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A store and registry after a good sl_basic run and math_rl's stages up to tokenized,
    made with secrets planted in the environment."""
    from conftest import run_job

    home = tmp_path_factory.mktemp("populated")
    crucible, dagster = home / "crucible", home / "dagster"
    dagster.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(crucible))
        mp.setenv("DAGSTER_HOME", str(dagster))
        for name, value in SECRETS.items():
            mp.setenv(name, value)
        assert run_job("sl_basic", TINY_RUN_CONFIG).success
        selection = [AssetKey(["math_rl", s]) for s in ("base_model", "dataset", "tokenized")]
        assert execute("math_rl", TINY_RUN_CONFIG, selection).success
        yield crucible, dagster


def execute(job: str, run_config: dict, selection: list[AssetKey] | None = None):
    from dagster import DagsterInstance

    from crucible_jobs import defs

    with DagsterInstance.get() as instance:
        return defs.resolve_job_def(job).execute_in_process(
            run_config=config_for(job, run_config), instance=instance, raise_on_error=False, asset_selection=selection)


def failure_message(result) -> str:
    assert not result.success
    return "\n".join(str(e.step_failure_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE")


def with_op_config(op: str, **fields) -> dict:
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"].setdefault(op, {"config": {}})["config"].update(fields)
    return config


def assert_fails_and_changes_nothing(crucible: Path, job: str, config: dict, expected: list[str],
                                     selection: list[AssetKey] | None = None) -> None:
    before = tree_digest(crucible / "store"), tree_digest(crucible / "registry")
    message = failure_message(execute(job, config, selection))
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert (tree_digest(crucible / "store"), tree_digest(crucible / "registry")) == before


def test_bad_inputs_through_every_recipe_job_change_nothing(populated, huge_line):
    """Every record case through each of its recipes' jobs; every file case through
    sl_basic's (the file layer is shared; the loader tests above run it for all five).
    The dataset asset is the only selected stage, so nothing else could write either."""
    crucible, _ = populated
    assert (crucible / "registry" / "registry.json").exists()
    runs = [(recipe, CORPUS / c[1], record_expectations(c)[1]) for c in RECORD_CASES for recipe in c[0]]
    runs += [("sl_basic", corpus_file(n, huge_line), file_expectations(n, corpus_file(n, huge_line))) for n, _ in FILE_CASES]
    for recipe, path, expected in runs:
        config = with_op_config(f"{recipe}__dataset", **dataset_config(path))
        assert_fails_and_changes_nothing(crucible, recipe, config, expected, [AssetKey([recipe, "dataset"])])


@pytest.mark.parametrize("op,field,value,expected", [
    ("sl_basic__checkpoint", "learning_rate", -1e-3, ["SlBasicTrain", "learning_rate", "greater than 0"]),
    ("sl_basic__checkpoint", "batch_size", 0, ["SlBasicTrain", "batch_size", "greater than 0"]),
    ("sl_basic__tokenized", "max_length", 0, ["SlBasicTokenize", "max_length", "greater than or equal to 2"]),
])
def test_absurd_config_through_the_whole_job_changes_nothing(populated, op, field, value, expected):
    crucible, _ = populated
    assert_fails_and_changes_nothing(crucible, "sl_basic", with_op_config(op, **{field: value}), expected)


def test_group_size_one_through_math_rl_changes_nothing(populated):
    crucible, _ = populated
    assert_fails_and_changes_nothing(crucible, "math_rl", with_op_config("math_rl__checkpoint", group_size=1),
                                     ["MathRlTrain", "group_size", "greater than or equal to 2"],
                                     [AssetKey(["math_rl", "checkpoint"])])


def test_pickle_checkpoint_dir_is_refused_before_snapshot(populated, tmp_path):
    crucible, _ = populated
    model = ArtifactStore(root=str(crucible / "store")).latest("sl_basic/registered_model").dir
    pickled = tmp_path / "pickled_model"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that would run code")
    config = with_op_config("sl_basic__base_model", base_model=str(pickled))
    assert_fails_and_changes_nothing(crucible, "sl_basic", config,
                                     [str(pickled), "no .safetensors weights", "pytorch_model.bin", "can run code"],
                                     [AssetKey(["sl_basic", "base_model"])])


# -- integrity ----------------------------------------------------------------------------------


@pytest.fixture
def copied(populated, tmp_path, monkeypatch):
    """A private copy of the populated homes, for tests that damage them."""
    crucible = tmp_path / "crucible"
    shutil.copytree(populated[0], crucible, symlinks=True)
    (tmp_path / "dagster").mkdir()
    monkeypatch.setenv("CRUCIBLE_HOME", str(crucible))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return crucible


def flip_last_byte(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key,file", [
    ("sl_basic/tokenized", "train.parquet"),  # read as an input: the io manager verifies it
    ("sl_basic/checkpoint", "model/model.safetensors"),  # a cache hit: verified before it is handed on
    ("sl_basic/eval_report", "report.json"),  # read by the blocking check and the registry step
])
def test_flipped_byte_is_named_and_never_loaded(copied, key, file):
    store = ArtifactStore()
    ref = store.latest(key)
    flip_last_byte(ref.dir / file)
    objects = sorted(p.name for p in (store.base / "objects").iterdir())
    registry = tree_digest(copied / "registry")
    message = failure_message(execute("sl_basic", TINY_RUN_CONFIG))
    assert "IntegrityError" in message or "fails its manifest" in message
    assert key in message and file in message and ref.content_hash in message
    assert sorted(p.name for p in (store.base / "objects").iterdir()) == objects  # nothing built from it
    assert tree_digest(copied / "registry") == registry


def test_open_verified_refuses_missing_and_extra_files(tmp_path):
    store = ArtifactStore(root=str(tmp_path))
    ref = store.write("x/y", "a" * 32, lambda out: (out / "f.txt").write_text("hello") and None, {})
    (ref.dir / "f.txt").chmod(0o644)
    (ref.dir / "f.txt").unlink()
    (ref.dir / "extra.bin").write_bytes(b"planted")
    with pytest.raises(IntegrityError, match="extra.bin, f.txt"):
        store.open_verified(ref)


def test_a_ref_cannot_point_outside_the_store(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    ref = store.write("x/y", "a" * 32, lambda out: (out / "f.txt").write_text("hello") and None, {})
    store.set_latest(ref.model_copy(update={"path": str(tmp_path / "elsewhere")}))
    assert store.latest("x/y").dir == tmp_path / "store" / "objects" / ref.content_hash
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "store", moved)
    assert ArtifactStore(root=str(moved)).latest_verified("x/y").dir == moved / "objects" / ref.content_hash


# -- security -------------------------------------------------------------------------------------


ESCAPES = ["../escape", "../../etc/passwd", "/abs/path", "a/../../b", "a//b", "a/./b", ".hidden/../x", "", "a\\..\\b",
           "a/b/..", "~/x", "a\x00b"]


@pytest.mark.parametrize("name", ESCAPES)
def test_store_and_registry_refuse_names_that_escape(tmp_path, name):
    store, registry = ArtifactStore(root=str(tmp_path / "store")), ModelRegistry(root=str(tmp_path / "registry"))
    attempts = [
        lambda: store.latest(name),
        lambda: store.lookup(name),
        lambda: store.manifest(name),
        lambda: store.work_dir(name),
        lambda: store.write(name, "a" * 32, lambda out: None, {}),
        lambda: store.write("ok/key", name, lambda out: None, {}),
        lambda: ArtifactRef(key=name, fingerprint="a" * 32, content_hash="b" * 32, path="/tmp"),
        lambda: ArtifactRef(key="ok", fingerprint="a" * 32, content_hash=name, path="/tmp"),
        lambda: registry.register(name, {"fingerprint": "a" * 32, "metrics": {}}, "m"),
        lambda: registry.find(name, "a" * 32),
        lambda: registry.resolve(f"{name}@latest"),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises((ValueError, KeyError)):
            attempt()
            pytest.fail(f"attempt {i} accepted {name!r}")
    leaked = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leaked == [] and not (tmp_path.parent / "escape").exists()


def test_secrets_never_reach_logs_metadata_or_manifests(populated):
    """The populated run had TINKER_API_KEY and HF_TOKEN set; no file it wrote holds them."""
    crucible, dagster = populated
    files = [p for root in (crucible, dagster) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".db" for p in files)  # the event log is scanned too
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"


def test_remote_code_is_not_run_unless_asked(populated, tmp_path):
    from resources.hf_io import load_model
    from resources.backends.local.backend import LocalTorchBackend

    crucible, _ = populated
    model = tmp_path / "model"
    shutil.copytree(ArtifactStore(root=str(crucible / "store")).latest("sl_basic/registered_model").dir, model)
    for p in model.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    marker = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    assert LocalTorchBackend().trust_remote_code is False
    load_model(model)
    assert not marker.exists()


def test_training_state_holds_no_pickles_and_nothing_unpickles():
    """Optimizer state is safetensors + JSON; any torch.load in our code must be weights_only."""
    repo = Path(__file__).resolve().parents[1]
    for path in [p for d in ("crucible_assets", "resources", "crucible_jobs", "recipes") for p in (repo / d).rglob("*.py")]:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{i}: torch.load without weights_only=True"
            assert "pickle.load" not in line, f"{path}:{i}: unpickles"


def test_saved_state_is_safetensors_and_json_only(populated):
    crucible, _ = populated
    state = ArtifactStore(root=str(crucible / "store")).latest("sl_basic/checkpoint").dir / "state"
    suffixes = {p.suffix for p in state.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json"} and ".safetensors" in suffixes


def test_pickle_weights_are_refused_by_the_loader(tmp_path):
    from resources.hf_io import UnsafeWeightsError, load_model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeWeightsError, match="only pickle files .*pytorch_model.bin.*can run code.*convert it to safetensors"):
        load_model(tmp_path)


# -- faults ---------------------------------------------------------------------------------------


CONCURRENT = """
import sys, time
from pathlib import Path
from resources.store.artifact_store import ArtifactStore
root, go = sys.argv[1], Path(sys.argv[2])
def build(out):
    (out / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    Path(root, "built_" + sys.argv[3]).touch()
    while not go.exists():
        time.sleep(0.01)
    return {"rows": 1}
store = ArtifactStore(root=root)
ref = store.write("race/asset", "c" * 32, build, {"run_id": sys.argv[3]})
store.set_latest(ref)
print(ref.content_hash)
"""


def test_two_processes_materializing_the_same_asset_yield_one_artifact(tmp_path):
    """Both builds finish before either publishes, so both renames race for one object."""
    root, go = tmp_path / "store", tmp_path / "go"
    root.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(root), str(go), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]) for i in (1, 2)]
    while not all((root / f"built_{i}").exists() for i in (1, 2)):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    go.touch()
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    hashes = {o.strip() for o, _ in outs}
    store = ArtifactStore(root=str(root))
    assert len(hashes) == 1 and [p.name for p in (root / "objects").iterdir()] == list(hashes)
    assert store.verify(store.latest("race/asset")) == []
    assert list((root / "tmp").iterdir()) == []


TRAIN_SAME = """
import sys, time
from pathlib import Path
from resources.store.artifact_store import ArtifactStore
root, go, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def build(out, work):
    save = work / "step_0000002"
    assert not save.exists(), "a second trainer found the first one's save"
    Path(root, "training_" + me).touch()
    save.mkdir()
    while not go.exists():
        time.sleep(0.01)
    (out / "weights.bin").write_bytes(me.encode())
ref, built = ArtifactStore(root=root).build_once("race/checkpoint", "b" * 32, build, {}, log=lambda m: print(m, flush=True))
print("built" if built else "hit", ref.content_hash, flush=True)
"""


def test_two_processes_training_the_same_fingerprint_train_it_once(tmp_path):
    """The second waits for the first instead of resuming from its half-done work dir."""
    root, go = tmp_path / "store", tmp_path / "go"
    root.mkdir()
    run = lambda i: subprocess.Popen([sys.executable, "-c", TRAIN_SAME, str(root), str(go), str(i)],  # noqa: E731
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
    first = run(1)
    while not (root / "training_1").exists():
        assert first.poll() is None, first.communicate()
    second = run(2)
    assert "another process is materializing fingerprint " + "b" * 32 in second.stdout.readline()
    go.touch()
    outs = [p.communicate() for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    (built, h1), (hit, h2) = (o.split() for o, _ in outs)
    assert (built, hit) == ("built", "hit") and h1 == h2
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("training_")) == ["training_1"]
    assert ArtifactStore(root=str(root)).verify(ArtifactStore(root=str(root)).lookup("b" * 32)) == []


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_save(populated, tmp_path):
    import math

    import pyarrow.parquet as pq

    from crucible_assets.train.sft import train_sft
    from crucible_assets.train.loop import TrainConfig
    from resources.backends.local.backend import LocalTorchBackend

    crucible, _ = populated
    store = ArtifactStore(root=str(tmp_path / "store"))
    source = ArtifactStore(root=str(crucible / "store"))
    rows = [(r["tokens"], r["weights"]) for r in pq.read_table(source.latest("sl_basic/tokenized").dir / "train.parquet").to_pylist()[:32]]
    backend = LocalTorchBackend(device="cpu", precision="fp32")
    client = backend.create_training_client(source.latest("sl_basic/base_model").dir, 0, 0)
    real_fb = client.forward_backward

    def poisoned(data, loss_fn, *a, **kw):  # the 8th step's loss is NaN, as a diverged run's would be
        out = real_fb(data, loss_fn, *a, **kw)
        poisoned.calls += 1
        if poisoned.calls == 8:
            out.metrics["loss:sum"] = math.nan
        return out
    poisoned.calls = 0
    client.forward_backward = poisoned
    cfg = TrainConfig(max_steps=12, batch_size=4, save_every=5, eval_every=100, warmup_steps=0)
    fp = "d" * 32

    def build(out):
        train_sft(client, rows, rows[:4], cfg, store.work_dir(fp), lambda _: None)

    with pytest.raises(FloatingPointError, match=r"step 7: train_mean_nll is nan; last good state is in .*/work/d{32}"):
        store.write("nan/checkpoint", fp, build, {})
    assert store.lookup(fp) is None and not (store.base / "objects").exists()
    saves = sorted(p.name for p in store.work_dir(fp).iterdir())
    assert saves == ["step_0000005"]
    backend.create_training_client(source.latest("sl_basic/base_model").dir, 0, 0).load_state(store.work_dir(fp) / saves[0])


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_full_filesystem_fails_cleanly_and_half_writes_nothing(tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        skip_or_fail_under_ci("cannot mount a tmpfs here (needs root and mount permission; CI runs as root)")
    try:
        store = ArtifactStore(root=str(disk / "store"))
        with pytest.raises(OSError) as err:
            store.write("full/asset", "e" * 32, lambda out: (out / "big.bin").write_bytes(b"\0" * (2 << 20)), {})
        assert err.value.errno == errno.ENOSPC
        assert [p for p in (disk / "store").rglob("*") if p.is_file()] == []
        assert store.lookup("e" * 32) is None
        (disk / "filler").write_bytes(b"\0" * ((1 << 20) - 8192))  # leave less room than the next write needs
        with pytest.raises(OSError):
            atomic_write_text(disk / "store" / "refs" / "x.json", "y" * 65536)
        assert not (disk / "store" / "refs" / "x.json").exists()
        assert list((disk / "store" / "refs").iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_full_filesystem_during_a_training_save_keeps_the_last_good_save(populated, tmp_path):
    """The work dir fits one save but not a second beside it: the step-4 save fails with
    ENOSPC, leaves no partial save, the step-2 save still loads, and nothing is published."""
    import pyarrow.parquet as pq

    from crucible_assets.train.sft import train_sft
    from crucible_assets.train.loop import TrainConfig
    from resources.backends.local.backend import LocalTorchBackend

    crucible, _ = populated
    source = ArtifactStore(root=str(crucible / "store"))
    rows = [(r["tokens"], r["weights"]) for r in pq.read_table(source.latest("sl_basic/tokenized").dir / "train.parquet").to_pylist()[:32]]
    backend = LocalTorchBackend(device="cpu", precision="fp32")
    new_client = lambda: backend.create_training_client(source.latest("sl_basic/base_model").dir, 0, 0)  # noqa: E731
    probe = TrainConfig(max_steps=2, batch_size=4, save_every=1, eval_every=100, warmup_steps=0)
    train_sft(new_client(), rows, rows[:4], probe, tmp_path / "probe", lambda _: None)
    one_save = sum(p.stat().st_size for p in (tmp_path / "probe").rglob("*") if p.is_file())  # with optimizer moments
    client = new_client()
    store = ArtifactStore(root=str(tmp_path / "store"))
    if not mount_tmpfs(store.base / "work", f"{int(one_save * 1.5) // 4096 * 4096 + 65536}"):
        skip_or_fail_under_ci("cannot mount a tmpfs here (needs root and mount permission; CI runs as root)")
    try:
        fp = "a" * 32
        cfg = TrainConfig(max_steps=6, batch_size=4, save_every=2, eval_every=100, warmup_steps=0)
        # safetensors raises its own error type, with the OS's message
        with pytest.raises(Exception, match=r"No space left on device|\[Errno 28\]"):
            store.write("full/checkpoint", fp, lambda out: train_sft(client, rows, rows[:4], cfg, store.work_dir(fp), lambda _: None), {})
        assert sorted(p.name for p in store.work_dir(fp).iterdir()) == ["step_0000002"]
        assert store.lookup(fp) is None and not (store.base / "objects").exists()
        assert list((store.base / "tmp").iterdir()) == []
        new_client().load_state(store.work_dir(fp) / "step_0000002")
    finally:
        subprocess.run(["umount", str(store.base / "work")], check=False)


@pytest.mark.slow
def test_sigkill_campaign_loses_nothing_and_resumes_bit_identical(populated, tmp_path):
    """20 seeded trials: half killed after a random delay, half just before a random
    filesystem write (see fault_worker.py). After each kill nothing partial is visible;
    each re-run ends on the bytes of an uninterrupted run."""
    crucible, _ = populated
    source = ArtifactStore(root=str(crucible / "store"))
    spec = {"root": str(tmp_path), "seed": 20261129, "trials": 20,
            "base_model": str(source.latest("sl_basic/base_model").dir), "tokenized": str(source.latest("sl_basic/tokenized").dir)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "fault_worker.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (tmp_path / "campaign.json").write_text(json.dumps(result, indent=1))
    trials = result["trials"]
    assert len(trials) == 20
    for t in trials:
        assert t["after_kill"]["problems"] == [] and t["final"]["problems"] == [], t
        assert t["after_kill"]["manifests"] <= 1 and t["after_kill"]["objects"] <= 1, t
        assert t["resumed_ok"] and t["content_hash"] == result["reference"], t
        assert t["final"] == {"manifests": 1, "refs": 1, "objects": 1, "problems": []}, t
    killed = [t for t in trials if t["killed"]]
    assert len(killed) == 20, f"only {len(killed)} of 20 runs were still running when killed"
    assert any(t["resumed_from_step"] for t in trials), "no trial resumed from a save"
    print(json.dumps([{k: t[k] for k in ("trial", "kill", "at", "killed", "resumed_from_step")} for t in trials]))
