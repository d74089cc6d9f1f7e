"""The first hour (issue 21): a new user's data either loads or is refused before any
training, with a message naming their file by its absolute path (a relative one with the
directory it was resolved against), the line and the field. Corpus: tests/bad_inputs_user/
(its README.md lists each file)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from resources.datasets.pairs import validate_pair
from resources.datasets.problems import validate_problem
from resources.datasets.sources import DatasetConfig, DatasetError, load_records, validate_record

CORPUS = Path(__file__).parent / "bad_inputs_user"
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}

# (file, what the message must say besides the file's absolute path); read as source: jsonl
READER_CASES = [
    ("utf16.jsonl", ["line 1", "not UTF-8", "the file is UTF-16", "save it as UTF-8"]),
    ("gzipped.jsonl", ["line 1", "not UTF-8", "gzip-compressed: gunzip it first"]),
    ("parquet_named.jsonl", ["line 1", "not UTF-8", "the file is Parquet: set source: parquet"]),
    ("json_array.jsonl", ["line 1", "expected a JSON object, got a list of 3 objects", "not a JSON array"]),
    ("pretty_printed.jsonl", ["line 1", "malformed JSON", "one whole JSON object per line", "pretty-printed"]),
]
# (file, record, field, problem): references no grader can read, refused by validate_problem
PROBLEM_CASES = [
    ("problems_word_answer.jsonl", "line 2", "answer",
     "'seventeen' has no number, so the arithmetic and gsm8k graders cannot grade it"),
    ("problems_gsm8k_no_hashes.jsonl", "line 2", "answer",
     "a worked solution (with GSM8K calculator notes like <<12*6=72>>) with no '#### <number>' line"),
    ("problems_worked_solution.jsonl", "line 2", "answer", "a worked solution (2 lines) with no '#### <number>' line"),
    ("problems_gsm8k_word_after_hashes.jsonl", "line 1", "answer", "'#### seventy-two' has no number after '####'"),
    ("problems_gsm8k_nothing_after_hashes.jsonl", "line 2", "answer", "nothing after '####'"),
    ("problems_math_empty_boxed.jsonl", "line 1", "solution", "its last \\boxed{} is empty"),
    ("problems_math_unbalanced_boxed.jsonl", "line 2", "solution", "no \\boxed{} answer (or unbalanced braces)"),
]


def problem_loaders():
    """The dataset config classes of the recipes that read problems, as their jobs use them."""
    import recipes.distillation
    import recipes.math_rl

    return {"math_rl": recipes.math_rl.MathRlDataset, "distillation": recipes.distillation.DistillDataset}


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _refusal(cfg: DatasetConfig, validate=None) -> str:
    with pytest.raises(DatasetError) as err:
        load_records(cfg, validate)
    return str(err.value)


# -- the reader ------------------------------------------------------------------------


def test_every_user_corpus_file_is_exercised():
    used = {n for n, _ in READER_CASES} | {c[0] for c in PROBLEM_CASES} | {"bom.jsonl"}
    assert {p.name for p in CORPUS.iterdir() if p.name != "README.md"} == used


def test_utf8_bom_is_accepted_and_stripped(tmp_path):
    bom = CORPUS / "bom.jsonl"
    raw = bom.read_bytes()
    assert raw.startswith(codecs.BOM_UTF8)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(raw[len(codecs.BOM_UTF8):])
    got = load_records(DatasetConfig(source="jsonl", path=str(bom)))
    assert got == load_records(DatasetConfig(source="jsonl", path=str(plain)))
    assert len(got) == 3 and got[0]["messages"][0]["content"] == "What is 2 + 3?"


def test_bom_only_on_the_first_line_is_stripped(tmp_path):
    """A BOM in the middle of a file is not an encoding marker; the line it starts is malformed."""
    p = tmp_path / "mid.jsonl"
    p.write_bytes(json.dumps(CHAT).encode() + b"\n" + codecs.BOM_UTF8 + json.dumps(CHAT).encode() + b"\n")
    msg = _refusal(DatasetConfig(source="jsonl", path=str(p)))
    assert str(p) in msg and "line 2" in msg and "malformed JSON" in msg


@pytest.mark.parametrize("name,expected", READER_CASES, ids=[n for n, _ in READER_CASES])
def test_files_that_are_not_jsonl_say_what_they_are(name, expected):
    path = CORPUS / name
    msg = _refusal(DatasetConfig(source="jsonl", path=str(path)))
    for part in [f"{path}: ", *expected]:
        assert part in msg, msg


def test_jsonl_read_as_parquet_says_so():
    path = CORPUS / "bom.jsonl"
    msg = _refusal(DatasetConfig(source="parquet", path=str(path)))
    assert msg.startswith(f"{path}: unreadable Parquet (") and msg.endswith("; the file looks like JSON Lines: set source: jsonl")


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_a_directory_gets_its_own_message(tmp_path, source):
    folder = tmp_path / "shards"
    for name in ("b", "a"):
        _write(folder / f"{name}.{source}", [CHAT])
    msg = _refusal(DatasetConfig(source=source, path=str(folder)))
    assert msg.startswith(f"{folder}: is a directory, not a data file; name one .{source} file in it (it holds a.{source}, b.{source})")
    builder = "json" if source == "jsonl" else "parquet"
    assert f"source: hf, path: {builder}, data_files: [...]" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _refusal(DatasetConfig(source=source, path=str(empty))) == \
        f"{empty}: is a directory, not a data file; name one .{source} file in it (it holds no .{source} file)"


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_missing_relative_path_shows_where_it_was_looked_for(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    msg = _refusal(DatasetConfig(source=source, path=f"data/x.{source}"))
    assert msg == f"data/x.{source} (resolved against {tmp_path} as {tmp_path}/data/x.{source}): no such file"


def test_missing_absolute_path_is_shown_as_given(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _refusal(DatasetConfig(source="jsonl", path=str(path))) == f"{path}: no such file"


def test_dangling_symlink_names_its_target(tmp_path):
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    assert _refusal(DatasetConfig(source="jsonl", path=str(link))) == \
        f"{link}: no such file (a symlink to {tmp_path / 'gone.jsonl'}, which does not exist)"


def test_empty_path_is_a_config_error():
    assert _refusal(DatasetConfig(source="jsonl", path="")) == \
        "dataset config: field 'path': empty; source 'jsonl' reads one local .jsonl file, name it"


def test_record_errors_in_a_relative_file_name_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "data" / "p.jsonl", [{"question": "What is 8 + 9?", "answer": "seventeen"}])
    msg = _refusal(DatasetConfig(source="jsonl", path="data/p.jsonl"), validate_problem)
    assert msg.startswith(f"{tmp_path}/data/p.jsonl: line 1: field 'answer': 'seventeen' has no number")


def test_hf_local_data_files_missing_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _refusal(DatasetConfig(source="hf", path="json", data_files=["data/x.jsonl"]))
    assert msg == f"data/x.jsonl (resolved against {tmp_path} as {tmp_path}/data/x.jsonl): no such file"


# -- notes: what is not an error but should be seen --------------------------------------


def test_num_examples_beyond_the_file_is_noted(tmp_path):
    path = _write(tmp_path / "three.jsonl", [CHAT] * 3)
    notes: list[str] = []
    records = load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=5000), notes=notes)
    assert len(records) == 3
    assert notes == [f"num_examples 5000 asks for more records than {path} has (3); using 3"]


def test_num_examples_within_the_file_or_zero_is_not_noted(tmp_path):
    path = _write(tmp_path / "three.jsonl", [CHAT] * 3)
    for n, want in ((2, 2), (3, 3), (0, 3)):
        notes: list[str] = []
        assert len(load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=n), notes=notes)) == want
        assert notes == []


def test_load_records_without_notes_still_works(tmp_path, capsys):
    path = _write(tmp_path / "three.jsonl", [CHAT] * 3)
    assert len(load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=5000), validate_record)) == 3
    assert capsys.readouterr() == ("", "")  # the loader never prints; the asset reports notes


def _helpsteer(pref: int) -> dict:
    return {"context": [{"role": "user", "content": "Name a color."}], "response1": "Red.",
            "response2": "Blue.", "overall_preference": pref}


def test_dropped_records_are_counted_with_their_lines(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [_helpsteer(-2), _helpsteer(0), _helpsteer(1), _helpsteer(0)])
    notes: list[str] = []
    records = load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=2), validate_pair, notes)
    assert len(records) == 2
    assert notes == [f"{path}: 2 of 4 records dropped (HelpSteer3 ties: overall_preference 0): line 2, line 4"]
    notes = []
    load_records(DatasetConfig(source="jsonl", path=str(path), num_examples=10), validate_pair, notes)
    assert notes[1] == f"num_examples 10 asks for more records than {path} has (2 usable of 4); using 2"


def test_all_records_dropped_says_why(tmp_path):
    path = _write(tmp_path / "ties.jsonl", [_helpsteer(0)] * 3)
    assert _refusal(DatasetConfig(source="jsonl", path=str(path)), validate_pair) == \
        f"{path}: no records (all 3 were dropped: HelpSteer3 ties: overall_preference 0)"


# -- references the graders cannot read -------------------------------------------------


@pytest.mark.parametrize("recipe", ["math_rl", "distillation"])
@pytest.mark.parametrize("case", PROBLEM_CASES, ids=[c[0] for c in PROBLEM_CASES])
def test_unparseable_references_name_file_line_and_field(recipe, case):
    name, record, field, problem = case
    path = CORPUS / name
    msg = _refusal(problem_loaders()[recipe](source="jsonl", path=str(path)), validate_problem)
    assert msg.startswith(f"{path}: {record}: field {field!r}: "), msg
    assert problem in msg, msg


@pytest.mark.parametrize("record,answer", [
    ({"question": "What is 2 + 3?", "answer": "5"}, "5"),
    ({"question": "What is 2 + 3?", "answer": 5}, "5"),
    ({"question": "How much?", "answer": "$1,000"}, "$1,000"),
    ({"question": "Tom has 3 + 4 apples.", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}, "7"),
    ({"question": "Tom has 1000 apples.", "answer": "So many.\n#### 1,000"}, "1000"),
    ({"question": "Area of the unit circle?", "answer": "$\\pi$"}, "$\\pi$"),
    ({"question": "Area of the unit circle?", "answer": "\\pi"}, "\\pi"),
    ({"question": "A vector?", "answer": "\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}"}, "\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}"),
    ({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}, "\\frac{1}{2}"),
    ({"problem": "Which letter?", "solution": "It is $\\boxed{x}$."}, "x"),
])
def test_gradeable_references_still_load(record, answer):
    assert validate_problem(record, "f.jsonl", "line 1")["answer"] == answer


def test_accepted_references_are_ones_their_grader_reads():
    """What validation lets through, each grader extracts: the check and the graders agree."""
    from resources.datasets.graders import grade

    gsm = validate_problem({"question": "q", "answer": "w\n#### 72"}, "f", "line 1")["answer"]
    assert grade("gsm8k", "so 72", gsm) == (True, True)
    plain = validate_problem({"question": "q", "answer": "17 apples"}, "f", "line 1")["answer"]
    assert grade("arithmetic", "it is 17", plain) == (True, True)
    boxed = validate_problem({"problem": "q", "solution": "\\boxed{\\frac{1}{2}}"}, "f", "line 1")["answer"]
    assert grade("math", "\\boxed{0.5}", boxed)[1]

