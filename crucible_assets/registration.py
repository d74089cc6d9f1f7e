"""`<recipe>/registered_model`: a registry version of the checkpoint (aliases latest and
staging), an HF-format export with a model card, and the lineage edge to the model it was
trained from. Its blocking check (checks.py) promotes it to champion when its gate metric
beats the champion's."""

import json

from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field

from crucible_assets import evaluation
from crucible_assets.caching import cached_artifact, key
from resources.backends.resource import TrainingBackendResource
from resources.store.artifact_store import ArtifactRef, ArtifactStore, fingerprint
from resources.store.lineage import ancestry as lineage_ancestry
from resources.store.registry import ModelRegistry
from resources.tracking import TrackingResource


class RegisterConfig(Config):
    promotion_margin: float = Field(default=0.0, description="the new version becomes champion only if its gate metric beats "
                                                             "the champion's by more than this (in the metric's units)")


def model_card(recipe: str, lineage_edge: str, started_from: dict, report: dict, ancestry: list[dict], trained: dict,
               suites: list[str] = ()) -> str:
    """README.md of an export: what it came from (every ancestor's data version, the
    datasets' content hashes), how it was trained (`trained`: the checkpoint's manifest), what
    it scored. Only recorded inputs go in (no times, no run ids), so a reproduced chain writes
    the same bytes."""
    start = started_from.get("registered_model") or started_from["source"]
    lines = [f"# {recipe}", "", f"Trained by Crucible's `{recipe}` recipe.", "", "## Lineage", "",
             f"`{lineage_edge}`: `{start}`", "", "| artifact | data version | code version |", "|---|---|---|"]
    lines += [f"| `{m['key']}` | `{m['content_hash']}` | {m['code_version']} |" for m in ancestry]
    lines += ["", "## Data", ""]
    lines += [f"- `{m['key']}`: content hash `{m['content_hash']}`, source `{m['config'].get('source')}`"
              f"{' ' + m['config']['path'] if m['config'].get('path') else ''}, {m['summary'].get('rows')} records"
              for m in ancestry if m["key"].endswith("/dataset")]
    lines += ["", "## How it was trained", "", f"Backend: `{json.dumps(trained.get('backend'), sort_keys=True)}`; "
              f"{trained['summary'].get('steps')} steps. Training config:", "", "```json",
              json.dumps(trained["config"], indent=1, sort_keys=True), "```", "",
              "Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(trained.get("packages", {}).items())), ""]
    lines += ["## Metrics (held-out, vs. the starting model, 95% bootstrap CIs)", "", evaluation.markdown(report)]
    lines += suites
    lines += ["## Intended use", "",
              "Research experiments; a tiny model trained on the recipe's data, not for production use.", ""]
    return "\n".join(lines)


def sweep_edge(recipe: str, trained_as: str) -> dict:
    """A checkpoint first trained as a sweep point (`<recipe>/sweep_checkpoint/<point>`; the
    recipe's run at that config was its cache hit) names the sweep and point it came from."""
    prefix = f"{recipe}/sweep_checkpoint/"
    if not trained_as.startswith(prefix):
        return {}
    point = trained_as.removeprefix(prefix)
    return {"sweep": {"name": point.split(".", 1)[0], "point": point}}


def run_summary(recipe: str, report: dict, metric: str, version: int, aliases: list[str], eval_report: ArtifactRef) -> str:
    """The line a run ends on: the gate metric start vs trained with the paired gain's CI, the
    registry version and its aliases (champion follows in the promotion check), the report."""
    lo, hi = report[f"{metric}_delta_ci"]
    return (f"{recipe}: {metric} {report[f'start/{metric}']:.4g} -> {report[metric]:.4g} "
            f"(gain {report[f'{metric}_delta']:.4g}, 95% CI [{lo:.4g}, {hi:.4g}]); registered {recipe}:{version} "
            f"({', '.join(aliases) or 'no alias'}); report: {eval_report.dir / 'report.md'}")


def registered_model_asset(recipe: str, lineage_edge: str, metric: str, higher_is_better: bool, lineage_stage: str,
                           suites: tuple[str, ...] = ()):  # the eval suites' stages
    """`metric` (from the eval report) is what the promotion gate compares with the champion's;
    `lineage_edge` points at the model snapshot `lineage_stage` (the start, or a teacher);
    each eval suite's report is a section of the model card."""
    suite_ins = {stage: AssetIn(key=key(recipe, stage)) for stage in suites}

    @asset(key=key(recipe, "registered_model"), group_name=recipe, code_version="4", kinds={"huggingface"},
           ins={"checkpoint": AssetIn(key=key(recipe, "checkpoint")), "eval_report": AssetIn(key=key(recipe, "eval_report")),
                **suite_ins},
           description="A registry version of the checkpoint (latest and staging): HF-format export with a model card. "
                       f"Its blocking check promotes it to champion if its {metric} beats the champion's by the margin.")
    def _registered_model(context: AssetExecutionContext, config: RegisterConfig, store: ArtifactStore, registry: ModelRegistry,
                          backend: TrainingBackendResource, tracking: TrackingResource, checkpoint: ArtifactRef,
                          eval_report: ArtifactRef, **suite_reports: ArtifactRef) -> Output[ArtifactRef]:
        report = json.loads((eval_report.dir / "report.json").read_text())
        ckpt_manifest = store.manifest(checkpoint.fingerprint)
        upstream_versions = {u["key"]: u["content_hash"] for u in ckpt_manifest["upstream"]}
        edge_key = f"{recipe}/{lineage_stage}"
        edge_ref = next(u for u in ckpt_manifest["upstream"] if u["key"] == edge_key)
        edge_source = store.manifest(edge_ref["fingerprint"])["summary"]
        ancestry = lineage_ancestry(store, eval_report.fingerprint)

        def build(out, _work):
            exported = backend.export_model(checkpoint.dir / "model", out)
            sections = [(suite_reports[s].dir / "report.md").read_text() for s in suite_ins]
            (out / "README.md").write_text(model_card(recipe, lineage_edge, edge_source, report, ancestry, ckpt_manifest, sections))
            return {metric: report[metric], "model": recipe, **exported}

        output = cached_artifact(context, store, config={"model": recipe, "metric": metric},
                                 upstream={"checkpoint": checkpoint, "eval_report": eval_report, **suite_reports}, build=build)
        ref = output.value
        entry = registry.register(recipe, {
            "fingerprint": ref.fingerprint, "content_hash": ref.content_hash, "asset_key": ref.key, "path": ref.path,
            "metrics": {k: v for k, v in report.items() if isinstance(v, (int, float))},
            "eval_set": report["eval_set"]["id"], "eval_report": eval_report.fingerprint,
            "metric_cis": {k.removesuffix("_ci"): v for k, v in report.items() if k.endswith("_ci")},
            "lineage": {lineage_edge: {"data_version": upstream_versions[edge_key], "source": edge_source["source"],
                                       "model": edge_source.get("registered_model")},
                        "datasets": {k: v for k, v in upstream_versions.items() if k != edge_key},
                        **sweep_edge(recipe, ckpt_manifest["key"])},
            "data_hashes": {m["key"]: m["content_hash"] for m in ancestry if m["key"].endswith("/dataset")},
            "config_hash": fingerprint(configs={m["key"]: m["config"] for m in ancestry}),
            "run_id": context.run_id,
        }, gate={"metric": metric, "lower_is_better": not higher_is_better, "margin": config.promotion_margin})
        tracking.link_registration(checkpoint, entry, recipe)
        aliases = sorted(a for a, v in registry.models()[recipe]["aliases"].items() if v == entry["version"])
        context.log.info(run_summary(recipe, report, metric, entry["version"], aliases, eval_report))
        return Output(ref, data_version=output.data_version, metadata={**output.metadata, "registry_version": entry["version"]})

    return _registered_model
