"""`<recipe>/champion_eval`: the champion measured on the candidate's eval set, so the promotion
gate (checks.py `beats_champion`) compares two values of one eval set. A candidate trained on
other data was judged on other held-out rows than the champion was; its number and the
champion's own say nothing about each other. This asset runs the recipe's own `evaluate` with
the champion's registered export as the trained model, on exactly the inputs of the
candidate's eval report (its held-out rows, start, eval config, train config, teacher), so the
report it writes records the candidate's eval set, the same id.

When there is no champion, or the champion was measured on this very set, it only records
that nothing needed evaluating. When the champion cannot be evaluated here (its tokenizer is
not the one the held-out rows were tokenized with) it records why, and the gate refuses,
naming both eval sets. Which champion: the one the candidate is judged against
(`ModelRegistry.champion_for`), whose registered fingerprint is part of the cache key, so a
new champion gets a new eval and a cached re-run gets none."""

import json
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, Output, asset

from crucible_assets import evaluation, plots
from crucible_assets.caching import cached_artifact, key
from crucible_assets.eval_report import evaluate_model
from crucible_assets.evaluation import EvalConfig
from crucible_assets.train.algorithm import Algorithm
from resources.backends.resource import TrainingBackendResource
from resources.hf_io import load_tokenizer
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.registry import ModelRegistry

RECORD = "champion_eval.json"  # what the promotion gate reads
LAYOUT_VERSION = "1"  # this module's part of the code version (the algorithm's eval_version is the other)


def vocabulary_difference(model_dir: Path, tokenized_with: Path) -> str | None:
    """Why token ids from `tokenized_with`'s tokenizer would mean other tokens to the model in
    `model_dir`, or None when both tokenizers map every token to the same id."""
    mine, theirs = load_tokenizer(model_dir).get_vocab(), load_tokenizer(tokenized_with).get_vocab()
    if mine == theirs:
        return None
    moved = sum(mine.get(token) != i for token, i in theirs.items())
    return (f"its tokenizer ({len(mine)} tokens) is not the one the held-out rows were tokenized with "
            f"({len(theirs)} tokens, {moved} of them with another id or none in the champion's)")


def champion_record(store: ArtifactStore, recipe: str, eval_report: str) -> dict | None:
    """The latest champion_eval's record if it was made for the candidate whose eval report
    is `eval_report` (a fingerprint), with `source` naming the artifact; else None."""
    try:
        ref = store.latest_verified(key(recipe, "champion_eval").to_user_string())
    except FileNotFoundError:
        return None
    record = json.loads((ref.dir / RECORD).read_text())
    if record["candidate"]["eval_report"] != eval_report:
        return None
    return record | {"source": {"asset": ref.key, "fingerprint": ref.fingerprint, "data_version": ref.content_hash}}


def champion_eval_asset(recipe: str, algorithm: Algorithm, config_cls: type[EvalConfig], metric: str):
    """`metric`: the gate's, the value the promotion compares."""
    ylabel = algorithm.report_metric[1] if algorithm.report_metric[0] == metric else metric

    @asset(key=key(recipe, "champion_eval"), group_name=recipe, code_version=f"{algorithm.eval_version}.{LAYOUT_VERSION}",
           kinds={"json"}, ins={"eval_report": AssetIn(key=key(recipe, "eval_report"))},
           description=f"The champion evaluated on this candidate's eval set (its held-out rows, start and eval config), "
                       f"so the promotion gate beats_champion compares {metric} like with like; nothing to evaluate when "
                       "there is no champion or it was measured on this set. Its eval_table: start = the candidate's "
                       "starting model, trained = the champion.")
    def _champion_eval(context: AssetExecutionContext, store: ArtifactStore, registry: ModelRegistry,
                       backend: TrainingBackendResource, eval_report: ArtifactRef) -> Output[ArtifactRef]:
        candidate = json.loads((eval_report.dir / "report.json").read_text())
        evaluated_with = store.manifest(eval_report.fingerprint)
        inputs = {u["key"].split("/", 1)[1]: store.lookup(u["fingerprint"]) for u in evaluated_with["upstream"]}
        champion = registry.champion_for(recipe, eval_report.fingerprint)
        eval_set = candidate["eval_set"]["id"]
        record = {"candidate": {"eval_report": eval_report.fingerprint, "value": candidate.get(metric)}, "eval_set": eval_set,
                  "metric": metric, "champion": champion and {k: champion.get(k) for k in ("version", "fingerprint", "eval_set")}}

        def build(out: Path, _work: Path) -> dict:
            outcome, report = measure(out) if champion else ({"status": "not_needed", "reason": f"no {recipe} champion yet"}, {})
            (out / RECORD).write_text(json.dumps(record | outcome, indent=1, sort_keys=True))
            context.log.info(f"{recipe}/champion_eval: {outcome['reason']}")
            shown = {"status": outcome["status"], "reason": outcome["reason"], "eval_set": eval_set, "metric": metric,
                     "candidate_value": candidate.get(metric), "champion_value": outcome.get("champion_value"),
                     "champion": champion and f"{recipe}:{champion['version']}",
                     "champion_eval_set": champion and champion.get("eval_set")}
            return {k: v for k, v in shown.items() if v is not None} | report

        def measure(out: Path) -> tuple[dict, dict]:
            """(the outcome the gate reads, the champion's report as the UI shows it)"""
            name = f"champion v{champion['version']}"
            if champion.get("eval_set") == eval_set:
                return {"status": "not_needed", "reason": f"{name} was measured on this eval set ({eval_set[:12]}): its own "
                                                          f"{metric} compares as it is"}, {}
            ref = store.lookup(champion["fingerprint"])
            if ref is None:
                return {"status": "not_evaluable", "reason": f"{name}'s export ({champion['fingerprint']}) is not in the "
                                                             "store"}, {}
            model_dir = store.open_verified(ref)
            if why := vocabulary_difference(model_dir, inputs["base_model"].dir):
                return {"status": "not_evaluable", "reason": why}, {}
            config = config_cls(**evaluated_with["config"])  # the candidate's eval config
            report, _ = evaluate_model(recipe, algorithm, store, backend, config, model_dir, inputs)
            (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
            (out / "report.md").write_text(f"# {recipe}: {name} on eval set {eval_set[:12]}\n\ntrained: {name}; start: the "
                                           "candidate's starting model.\n\n" + evaluation.markdown(report))
            shown = {k: v for k, v in report.items() if k not in ("samples", "eval_set")} | {"plots": []}
            if metric in report and metric in candidate:
                plots.comparison([name, "candidate"], [report[metric], candidate[metric]],
                                 [report[f"{metric}_ci"], candidate[f"{metric}_ci"]], ylabel, out / "comparison.png")
                shown["plots"].append("comparison.png")
            held_out = report["eval_set"]["id"]  # the candidate's, by construction; the gate checks it
            return {"status": "evaluated", "eval_set": held_out, "champion_value": report.get(metric),
                    "reason": f"{name} evaluated on the candidate's eval set {held_out[:12]} (its own report was on "
                              f"{(champion.get('eval_set') or '(not recorded)')[:12]})"}, shown

        upstream = {"eval_report": eval_report, **inputs}
        return cached_artifact(context, store, config={"metric": metric}, upstream=upstream, build=build,
                               backend=backend.identity(),
                               extra_inputs={"champion": champion and {k: champion.get(k) for k in ("fingerprint", "eval_set")}})

    return _champion_eval
