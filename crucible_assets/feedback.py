"""The feedback loop's data: user feedback on a served model's responses, curated into
training data that chat_sl and dpo read with their ordinary JSONL loaders.

A feedback record is one JSON object per line in `*.jsonl` files under the feedback folder
(`$CRUCIBLE_FEEDBACK_DIR`, default `$CRUCIBLE_HOME/feedback`):

    {"prompt": "What is 2 + 3?" or [{"role": "user", "content": ...}, ...],
     "response": "2 + 3 = 5", "rating": 4, "edited_response": null, "model_version": "chat_sl:3"}

`rating` is 1 (bad) to 5 (good); `edited_response` (optional) is a person's correction of
`response`; `model_version` is the registry spec of the model that answered. Writers should
write a file under another name (e.g. a dotfile) and rename it to `*.jsonl` when complete,
and name files so that they sort in time order (e.g. by date): records are read in file-name
then line order, and the rating trigger compares a model's first ratings with its latest.

Curation: a record becomes an SFT example (a tinker-cookbook conversation, `{"messages"}`)
when it was edited (the edit is the answer) or rated at least `min_rating`; an edited record
also becomes a DPO pair (`{"chosen", "rejected"}`: the edit over the original response)."""


import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field

from crucible_assets.caching import cached_artifact, key
from resources.datasets.sources import ROLES, DatasetConfig, DatasetError, load_records
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.home import crucible_home
from resources.store.jsonl import read_jsonl, to_jsonl

GROUP = "feedback"
RATING_RANGE = (1, 5)
MODEL_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*:[0-9]+")


def feedback_folder() -> Path:
    return Path(os.environ.get("CRUCIBLE_FEEDBACK_DIR") or crucible_home() / "feedback").expanduser()


def validate_feedback(record: Any, origin: str, where: str) -> dict:
    """Normalized record (prompt as a message list); errors name file, line and field."""

    def fail(field: str, problem: str) -> DatasetError:
        return DatasetError(f"{origin}: {where}: field {field!r}: {problem}")

    def text(field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise fail(field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise fail(field, "empty")
        return value

    if not isinstance(record, dict):
        raise DatasetError(f"{origin}: {where}: expected a JSON object, got {type(record).__name__}")
    for field in ("prompt", "response", "rating", "model_version"):
        if field not in record:
            raise fail(field, "missing")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": text("prompt", prompt)}]
    elif isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict):
                raise fail(f"prompt[{i}]", f"expected an object, got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise fail(f"prompt[{i}].role", f"expected one of {sorted(ROLES)}, got {m.get('role')!r}")
            text(f"prompt[{i}].content", m.get("content"))
        if prompt[-1]["role"] != "user":
            raise fail(f"prompt[{len(prompt) - 1}].role", "the prompt must end with the user's turn")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise fail("prompt", f"expected a string or a non-empty list of messages, got {type(prompt).__name__}")
    rating = record["rating"]
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise fail("rating", f"expected a number, got {rating!r}")
    if not RATING_RANGE[0] <= rating <= RATING_RANGE[1]:
        raise fail("rating", f"{rating} is outside {RATING_RANGE[0]}..{RATING_RANGE[1]}")
    edited = record.get("edited_response")
    model_version = text("model_version", record["model_version"])
    if not MODEL_VERSION.fullmatch(model_version):
        raise fail("model_version", f"{model_version!r} is not a registry version like 'chat_sl:3'")
    return {"prompt": prompt, "response": text("response", record["response"]), "rating": float(rating),
            "edited_response": None if edited is None else text("edited_response", edited), "model_version": model_version}


def load_feedback(folder: Path) -> list[dict]:
    """Every record of every `*.jsonl` file in `folder`, in file-name then line order."""
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"{folder}: no feedback files (*.jsonl)")
    return [r for f in files for r in load_records(DatasetConfig(source="jsonl", path=str(f), num_examples=0), validate_feedback)]


def _edited(record: dict) -> bool:
    return record["edited_response"] is not None and record["edited_response"].strip() != record["response"].strip()


def sft_examples(records: list[dict], min_rating: float) -> list[dict]:
    """Conversations that end in an answer worth imitating: a person's edit, else a well-rated response."""
    return [{"messages": r["prompt"] + [{"role": "assistant", "content": r["edited_response"] if _edited(r) else r["response"]}]}
            for r in records if _edited(r) or r["rating"] >= min_rating]


def dpo_pairs(records: list[dict]) -> list[dict]:
    """The edit preferred over the response it corrects."""
    return [{"chosen": r["prompt"] + [{"role": "assistant", "content": r["edited_response"]}],
             "rejected": r["prompt"] + [{"role": "assistant", "content": r["response"]}]}
            for r in records if _edited(r)]


def rating_drop(records: list[dict], model_version: str, window: int) -> float | None:
    """How far `model_version`'s mean rating over its latest `window` records fell below its
    baseline, the mean over its first `window`; None until it has two full windows."""
    ratings = [r["rating"] for r in records if r["model_version"] == model_version]
    if len(ratings) < 2 * window:
        return None
    return sum(ratings[:window]) / window - sum(ratings[-window:]) / window


class FeedbackDatasetConfig(Config):
    folder: str = Field(default="", description="folder of feedback *.jsonl files; empty: $CRUCIBLE_FEEDBACK_DIR or $CRUCIBLE_HOME/feedback")


class CurationConfig(Config):
    min_rating: float = Field(default=4.0, description="unedited responses rated at least this become SFT examples")


@asset(key=key(GROUP, "dataset"), group_name=GROUP, code_version="1", kinds={"json"},
       description="Every feedback record in the feedback folder, validated; data version = content hash.")
def feedback_dataset(context: AssetExecutionContext, config: FeedbackDatasetConfig, store: ArtifactStore) -> Output[ArtifactRef]:
    records = load_feedback(Path(config.folder).expanduser() if config.folder else feedback_folder())
    body = to_jsonl(records)

    def build(out, _work):
        (out / "records.jsonl").write_text(body)
        return {"rows": len(records), "edited": sum(map(_edited, records)),
                "mean_rating": sum(r["rating"] for r in records) / len(records),
                "model_versions": sorted({r["model_version"] for r in records})}

    # the folder is where records come from, not what they are: only their content is an input
    return cached_artifact(context, store, config={}, upstream={}, build=build,
                           extra_inputs={"records_hash": hashlib.sha256(body.encode()).hexdigest()})


def curated_asset(stage: str, file: str, trains: str, curate, description: str):
    """`curate(records, config)` -> records in the format `trains`' JSONL loader reads, written to `file`."""
    @asset(key=key(GROUP, stage), group_name=GROUP, code_version="1", kinds={"json"},
           ins={"dataset": AssetIn(key=key(GROUP, "dataset"))},
           description=f"{description} Train on it: {trains}__dataset source jsonl, path <artifact>/{file}.")
    def _curated(context: AssetExecutionContext, config: CurationConfig, store: ArtifactStore, dataset: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            examples = curate(read_jsonl(dataset.dir / "records.jsonl"), config)
            (out / file).write_text(to_jsonl(examples))
            return {"rows": len(examples), "file": file}

        return cached_artifact(context, store, config=config.model_dump(), upstream={"dataset": dataset}, build=build)

    return _curated


# stage: (file, the recipe whose JSONL loader reads it, curation, description)
CURATED = {
    "sft_examples": ("sft.jsonl", "chat_sl", lambda rs, c: sft_examples(rs, c.min_rating),
                     "Conversations ending in an edited or well-rated answer."),
    "dpo_pairs": ("pairs.jsonl", "dpo", lambda rs, _c: dpo_pairs(rs),
                  "Pairs preferring a person's edit over the original response."),
}

assets = [feedback_dataset] + [curated_asset(stage, *spec) for stage, spec in CURATED.items()]
