"""Blocking asset checks. Dataset checks run Great Expectations 1.x (ephemeral context,
pandas batch) on the stored records; their verdict on a data version is recorded in the
store, so a re-run on the same bytes reports it again instead of validating again. The eval
gate keeps a model that is not better than its start out of the registry; the promotion gate
makes a registered version champion only if it beats the current one."""


import json
import logging
from importlib.metadata import version
from typing import TYPE_CHECKING

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, multi_asset_check, asset_check

from crucible_assets.caching import key
from crucible_assets.champion_eval import champion_record
from crucible_assets.gate import Gate
from crucible_assets.tokenizing import SPLITS, record_origins, stored_splits
from resources.datasets.splits import record_identity
from resources.store.artifact_store import ArtifactRef, ArtifactStore, fingerprint
from resources.store.jsonl import read_jsonl
from resources.store.registry import ModelRegistry

if TYPE_CHECKING:
    import pandas as pd

logging.getLogger("great_expectations").setLevel(logging.WARNING)

# Part of every recorded dataset verdict's fingerprint: bump it when _row or validate changes
# what a verdict means, so no verdict of the old code is reused.
DATASET_CHECKS_VERSION = "3"  # 2: results keep the offending rows' indices; 3: held_out_disjoint
BASIC_CHECKS = ("schema", "non_empty", "no_nulls", "trainable_records", "held_out_disjoint")
CHAT_CHECKS = BASIC_CHECKS + ("roles_valid", "alternation", "no_empty_assistant_turns")
CHECKS_BY_KIND = {
    "conversations": CHAT_CHECKS,
    "pairs": CHAT_CHECKS + ("shared_prompt", "chosen_differs_from_rejected", "non_empty_completions"),
    "problems": BASIC_CHECKS,  # trainable: question and answer both non-empty
}
COLUMNS = ["split", "body", "identity", "assistant_chars", "text_chars", "roles", "empty_assistant_turns"]
ROLE = "(?:system|user|assistant|tool)"
# system prompts first, then user turns each answered by the assistant (tool results in between)
ALTERNATION = r"^(?:system,)*user,assistant(?:,tool,assistant)*(?:,user,assistant(?:,tool,assistant)*)*$"


def _row(split: str, r: dict) -> dict:
    """Columns for a conversation, a document or a problem (each with its held-out identity);
    for a pair, the chosen conversation plus how it relates to the rejected one."""
    if "question" in r:
        return {"split": split, "body": json.dumps(r, sort_keys=True), "identity": record_identity(r), "assistant_chars": None,
                "text_chars": min(len(r["question"].strip()), len(r["answer"].strip())), "roles": None, "empty_assistant_turns": None}
    messages = r.get("messages") or r.get("chosen") or []
    assistant = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    row = {
        "split": split,
        "body": json.dumps(r, sort_keys=True) if messages else r.get("text"),
        "identity": record_identity(r),
        "assistant_chars": sum(map(len, assistant)) if messages else None,
        "text_chars": len(r["text"].strip()) if "text" in r else None,
        "roles": ",".join(m["role"] for m in messages) if messages else None,
        "empty_assistant_turns": sum(not a for a in assistant) if messages else None,
    }
    if "rejected" in r:
        chosen, rejected = r["chosen"], r["rejected"]
        row["shared_prompt"] = chosen[:-1] == rejected[:-1]
        row["completions_differ"] = chosen[-1]["content"].strip() != rejected[-1]["content"].strip()
        row["completion_chars"] = min(len(chosen[-1]["content"].strip()), len(rejected[-1]["content"].strip()))
    return row


def record_frame(dataset: ArtifactRef) -> "pd.DataFrame":
    import pandas as pd

    rows = [_row(split, r) for split in stored_splits(dataset.dir) for r in read_jsonl(dataset.dir / f"{split}.jsonl")]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(COLUMNS + [k for r in rows[:1] for k in r])))


def validate(df: "pd.DataFrame") -> dict[str, tuple[bool, dict]]:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    from great_expectations.data_context.types.base import ProgressBarsConfig

    # a held-out row whose identity (normalised prompt or question) is also trained on
    trained = set(df.loc[df["split"] == "train", "identity"])
    df = df.assign(held_out_leak=(df["split"] != "train") & df["identity"].isin(trained))
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # a bar per expectation buries the run log
    batch = (context.data_sources.add_pandas("crucible").add_dataframe_asset("records")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df}))
    trainable_col = "assistant_chars" if df["assistant_chars"].notna().any() else "text_chars"
    expectations = {
        "schema": [gxe.ExpectColumnToExist(column=c) for c in ("split", "body")]
                  + [gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))],
        "non_empty": [gxe.ExpectTableRowCountToBeBetween(min_value=2)],
        "no_nulls": [gxe.ExpectColumnValuesToNotBeNull(column="body")],
        "held_out_disjoint": [gxe.ExpectColumnValuesToBeInSet(column="held_out_leak", value_set=[False])],
        "trainable_records": [gxe.ExpectColumnValuesToBeBetween(column=trainable_col, min_value=1)],
        # null (text records) is skipped by GX's column-map expectations
        "roles_valid": [gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=f"^{ROLE}(?:,{ROLE})*$")],
        "alternation": [gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ALTERNATION)],
        "no_empty_assistant_turns": [gxe.ExpectColumnValuesToBeBetween(column="empty_assistant_turns", max_value=0)],
    }
    if "shared_prompt" in df:
        expectations |= {
            "shared_prompt": [gxe.ExpectColumnValuesToBeInSet(column="shared_prompt", value_set=[True])],
            "chosen_differs_from_rejected": [gxe.ExpectColumnValuesToBeInSet(column="completions_differ", value_set=[True])],
            "non_empty_completions": [gxe.ExpectColumnValuesToBeBetween(column="completion_chars", min_value=1)],
        }
    results = {}
    for name, exps in expectations.items():
        outcomes = [batch.validate(e) for e in exps]
        results[name] = (all(o.success for o in outcomes),
                         {o.expectation_config.type: {"success": o.success, **{k: v for k, v in o.result.items() if k in ("observed_value", "unexpected_count", "partial_unexpected_list", "partial_unexpected_index_list")}} for o in outcomes})
    return results


def dataset_checks(recipe: str, kind: str):
    """`kind`: the recipe's data kind (crucible_assets/data.py)."""
    names = CHECKS_BY_KIND[kind]

    @multi_asset_check(specs=[AssetCheckSpec(name, asset=key(recipe, "dataset"), blocking=True) for name in names],
                       name=f"{recipe}__dataset_checks")
    def _checks(context: AssetCheckExecutionContext, store: ArtifactStore):
        dataset = store.latest_verified(key(recipe, "dataset").to_user_string())
        verdict, reused = recorded_verdict(store, dataset, names, context.run.run_id)
        for name in names:
            ok, details = verdict["results"][name]
            offending = [] if ok else offending_records(dataset, details)
            if not ok:
                context.log.error(f"{recipe}/dataset check {name!r} failed" + "".join(f"\n  {o}" for o in offending))
            yield AssetCheckResult(check_name=name, asset_key=key(recipe, "dataset"), passed=ok,
                                   severity=AssetCheckSeverity.ERROR,
                                   metadata={"great_expectations": details, **reused,
                                             **({"first_offending_records": offending} if offending else {})})

    return _checks


def offending_records(dataset: ArtifactRef, details: dict, shown: int = 5) -> list[str]:
    """The first records a failed check flagged, each named by the user's own file and line
    (the dataset's sources list) with the start of its content."""
    splits = stored_splits(dataset.dir)
    rows = [(split, i, r) for split in splits for i, r in enumerate(read_jsonl(dataset.dir / f"{split}.jsonl"), 1)]
    indices = sorted({i for result in details.values() for i in result.get("partial_unexpected_index_list", [])})
    origins = {split: record_origins(dataset.dir, split) for split in splits}
    return [f"{origins[split](i)}: {json.dumps(record)[:200]}" for split, i, record in (rows[k] for k in indices[:shown])]


def recorded_verdict(store: ArtifactStore, dataset: ArtifactRef, names: tuple[str, ...], run_id: str) -> tuple[dict, dict]:
    """The checks' verdict on this data version: validated now and recorded, or the one
    recorded before for the same bytes, check code and Great Expectations version (then with
    metadata naming the run that validated). Either way the results are the recorded JSON,
    so a reused verdict reports exactly what the first one did, a failure included."""
    fp = fingerprint(checks=names, code_version=DATASET_CHECKS_VERSION, data_version=dataset.content_hash,
                     great_expectations=version("great_expectations"))
    if (verdict := store.verdict(fp)) is not None:
        return verdict, {"reused_from_run": verdict["run_id"]}
    results = validate(record_frame(dataset))
    store.record_verdict(fp, {"run_id": run_id, "data_version": dataset.content_hash, "results": results})
    return store.verdict(fp), {}


def eval_gate_check(recipe: str, gate: Gate):
    """Blocks registration unless the eval report passes the recipe's gate (crucible_assets/gate.py)."""
    @asset_check(asset=key(recipe, "eval_report"), name="beats_starting_model", blocking=True, description=gate.describe())
    def _gate(context: AssetCheckExecutionContext, store: ArtifactStore) -> AssetCheckResult:
        ref = store.latest_verified(key(recipe, "eval_report").to_user_string())
        report = json.loads((ref.dir / "report.json").read_text())
        passed, lines = gate.judge(report)
        verdict = f"{recipe}: " + "; ".join(lines) + ("" if passed else ", so not registered")
        (context.log.info if passed else context.log.error)(verdict)
        judged = [f"{m}_delta" for m in (gate.metric, *(g.metric for g in gate.guards))]
        return AssetCheckResult(passed=passed, description=verdict,
                                metadata={**{d: report[d] for d in judged}, **{f"{d}_ci": report[f"{d}_ci"] for d in judged}})

    return _gate


def length_check(recipe: str):
    """Not blocking: truncation is a choice (max_length), but it should never go unnoticed."""
    @asset_check(asset=key(recipe, "tokenized"), name="length_distribution",
                 description="Token-length percentiles per split; warns when any example was truncated to max_length "
                             "or dropped as overlong.")
    def _lengths(store: ArtifactStore) -> AssetCheckResult:
        ref = store.latest_verified(key(recipe, "tokenized").to_user_string())
        summary = store.manifest(ref.fingerprint)["summary"]
        truncated = summary["train_truncated"] + summary["test_truncated"]
        dropped = summary["train_dropped_overlong"] + summary["test_dropped_overlong"]
        metadata = {f"{split}_{p}": v for split in ("train", "test") for p, v in summary[f"{split}_length_percentiles"].items()}
        return AssetCheckResult(passed=truncated == dropped == 0, severity=AssetCheckSeverity.WARN,
                                metadata={**metadata, "truncated": truncated, "dropped_overlong": dropped})

    return _lengths


def promotion_gate_check(recipe: str):
    """Judges the version the run registered against the champion (the metric and margin
    recorded at registration), both measured on the candidate's eval set: the champion's
    value from `<recipe>/champion_eval` where its own report was on another set. A failure
    leaves `champion` where it was and says why, as a warning: blocking (downstream waits for
    the verdict) but not fatal. champion_eval is a dependency of the check, not of the
    registered model, whose bytes (and "unsynced" mark) do not depend on the champion."""
    @asset_check(asset=key(recipe, "registered_model"), name="beats_champion", blocking=True,
                 additional_deps=[key(recipe, "champion_eval")],
                 description="Promotes the new version to champion if its gate metric beats the champion's by more than "
                             "the margin (registered_model config promotion_margin), both measured on the new version's "
                             "eval set (champion_eval evaluates the champion there when its own report was on another); "
                             "otherwise the champion stays, and the run still succeeds: a registered version that is "
                             "not promoted is no failure, and recipes that build on this one start from the champion.")
    def _promote(context: AssetCheckExecutionContext, store: ArtifactStore, registry: ModelRegistry) -> AssetCheckResult:
        ref = store.latest_verified(key(recipe, "registered_model").to_user_string())
        entry = registry.find(recipe, ref.fingerprint)
        measured = champion_record(store, recipe, entry.get("eval_report"))
        decision = registry.judge(recipe, entry["version"], measured=measured,
                                  who=f"check {recipe}/registered_model:beats_champion (run {context.run.run_id})")
        aliases = registry.models()[recipe]["aliases"]
        context.log.info(f"{recipe}:{entry['version']} {'passed' if decision['passed'] else 'did not pass'} beats_champion "
                         f"({decision['reason']}); champion: {recipe}:{aliases['champion']}")
        return AssetCheckResult(passed=decision["passed"], description=decision["reason"], severity=AssetCheckSeverity.WARN,
                                metadata={**{k: v for k, v in decision.items() if k != "time" and v is not None},
                                          "champion_now": aliases["champion"]})

    return _promote
