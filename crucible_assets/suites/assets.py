"""`<recipe>/eval_<suite>`: one eval suite (robustness, self_consistency, attribution; judge_eval) of the
trained checkpoint against the starting model on the held-out prompts, cached like every
asset; report.json, report.md (the section the registered model's card carries) and its
plots, shown in the UI as the eval report is. A recipe lists its suites in its spec."""

import json
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, Output, asset

from crucible_assets.caching import cached_artifact, key
from crucible_assets.evaluation import comparison_rows, table_lines
from crucible_assets.suites import attribution, judge, robustness, self_consistency
from crucible_assets.suites.prompts import grader_for, held_out_prompts
from crucible_assets.suites.suite import Suite, SuiteConfig, SuiteRun
from crucible_assets.tokenizing import read_stop
from crucible_assets.train.algorithm import Algorithm
from resources.api_models.resource import ApiModelsResource
from resources.backends.resource import TrainingBackendResource
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.registry import ModelRegistry

SUITES: dict[str, Suite] = {s.name: s for s in (robustness.SUITE, self_consistency.SUITE, attribution.SUITE, judge.SUITE)}
DEFAULT_SUITES = tuple(SUITES)
STAGES = ("checkpoint", "base_model", "tokenized", "dataset")


def suite_stage(name: str) -> str:
    return SUITES[name].asset_stage


def suite_markdown(suite: Suite, report: dict) -> str:
    """The suite's section of report.md and of the model card."""
    lines = [f"## {suite.title}", ""]
    if "skipped" in report:
        return "\n".join(lines + [f"Not run: {report['skipped']}", ""])
    lines += table_lines(comparison_rows(report)) + ["", suite.note, ""]
    if "ensemble/members" in report:
        lines += ["Members (greedy accuracy): " + ", ".join(f"`{s}` {v:.3g}" for s, v in report["ensemble/members"].items()), ""]
    if "attribution/worst_completeness_gap" in report:
        lines += [f"Completeness: the worst relative gap over {report['num_prompts']} prompts is "
                  f"{report['attribution/worst_completeness_gap']:.2g} (tolerance {report['tolerance']}, up to {report['steps']} "
                  f"steps); {'holds' if report['attribution/completeness_holds'] else 'DOES NOT HOLD: raise max_steps'}. "
                  "Heat map: attribution.png.", ""]
    for e in report.get("examples", []):
        lines.append(f"- {e['perturbation']}: `{e['prompt']}`")
    return "\n".join(lines) + "\n"


def skipped(backend: TrainingBackendResource, suite: Suite, config: SuiteConfig, prompts: list) -> str | None:
    if not config.enabled:
        return "turned off in this op's config (enabled: false)"
    if not prompts:
        return "the held-out split has no prompted records (plain text has no question to ask)"
    if suite.name == "attribution" and backend.kind != "local":
        return "attribution needs the model's gradients: the local backend"
    return None


def judge_problem(suite: Suite, config: SuiteConfig, models: ApiModelsResource) -> str | None:
    if suite is judge.SUITE and config.enabled and not models.model:
        return "judge_eval is enabled but no judge is configured: resources: models: config: {provider, model}"
    return None


def check_members(recipe: str, config: SuiteConfig) -> list[str]:
    """An ensemble's members, refused before any work where they cannot make a fair report."""
    members = list(getattr(config, "members", []))
    if len(set(members)) != len(members):
        raise ValueError(f"eval_self_consistency config: members {members} name one model twice")
    if members and getattr(config, "combine", "") == "vote" and len(members) < 3:
        raise ValueError(f"eval_self_consistency config: a vote of {len(members)} members is the first member's answer "
                         "whenever they disagree; name three or more, or combine: logprob_mean")
    if moving := [m for m in members if m.split("@")[0].split(":")[0] == recipe and ":" not in m]:
        raise ValueError(f"eval_self_consistency config: members {moving} follow an alias of {recipe} itself, whose next "
                         f"registration would move it and so re-register; pin a version ({recipe}:1)")
    return members


def eval_suite_asset(recipe: str, algorithm: Algorithm, suite: Suite):
    @asset(key=key(recipe, suite.asset_stage), group_name=recipe, code_version=suite.version, kinds={"json"},
           ins={s: AssetIn(key=key(recipe, s)) for s in STAGES}, description=f"{suite.title}. {suite.note}")
    def _suite(context: AssetExecutionContext, config: suite.config, store: ArtifactStore, backend: TrainingBackendResource,
               registry: ModelRegistry, models: ApiModelsResource, **inputs: ArtifactRef) -> Output[ArtifactRef]:
        # an ensemble's members are inputs: a member re-registered under its alias is another report
        members = {spec: registry.resolve(spec)["fingerprint"] for spec in check_members(recipe, config)} if config.enabled else {}

        def load_members(specs: list[str]) -> dict:
            refs = {s: store.lookup(members[s]) for s in specs}
            if missing := [s for s, ref in refs.items() if ref is None]:
                raise FileNotFoundError(f"ensemble members {missing} are in the registry but not in the store")
            return {s: backend.create_training_client(store.open_verified(ref), 0, config.seed) for s, ref in refs.items()}

        if problem := judge_problem(suite, config, models):
            raise ValueError(problem)

        def build(out: Path, _work: Path) -> dict:
            prompts = held_out_prompts(inputs["dataset"].dir, config.num_prompts)
            if why := skipped(backend, suite, config, prompts):
                report = {"skipped": why}
            else:
                trained_with = store.manifest(inputs["checkpoint"].fingerprint)
                trained = backend.create_training_client(inputs["checkpoint"].dir / "model", 0, config.seed)
                renderer = json.loads((inputs["tokenized"].dir / "render.json").read_text())["renderer"]
                report = suite.run(SuiteRun(
                    trained=trained, start=backend.create_training_client(inputs["base_model"].dir, 0, config.seed),
                    tokenizer=trained.tokenizer, prompts=prompts, renderer=renderer, stop=read_stop(inputs["tokenized"]),
                    grader=grader_for(algorithm.train_config(**trained_with["config"])), config=config, out=out,
                    members=load_members, judge=lambda: models.client(store)))
            (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
            (out / "report.md").write_text(suite_markdown(suite, report))
            shown = {k: v for k, v in report.items() if k not in ("samples", "examples")}
            if "judge/usage" in report:  # calls, cache hits, tokens, cost: each its own number in the UI
                shown |= {f"judge/{k}": v for k, v in shown.pop("judge/usage").items() if isinstance(v, (int, float))}
            return shown | {"plots": [p for p in suite.plots if (out / p).exists()]}

        # the judge is an input of what it judged (its calls are cached by content on their own: calls.py)
        judged_by = {"provider": models.provider, "model": models.model} if suite is judge.SUITE and config.enabled else None
        extra = {k: v for k, v in (("members", members), ("judge", judged_by)) if v}
        return cached_artifact(context, store, config=config.model_dump(), upstream=dict(inputs), build=build,
                               backend=backend.identity(), extra_inputs=extra or None)

    return _suite
