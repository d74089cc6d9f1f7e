"""Training data written with a hosted model (the `models` resource), as post-training teams
make it: `api_data/labelled_pairs` (RLAIF: the policy answers each prompt twice, a judge picks
the better answer in both orders, and the pairs it picks consistently become DPO data) and
`api_data/teacher_sft` (an API teacher writes the answer to each prompt: SFT data for chat_sl
or distillation). Each writes a JSONL file the recipe's own loader reads; point the recipe's
dataset at it (`source: jsonl`, `path: <artifact>/pairs.jsonl` or `sft.jsonl`). Every call is
cached by content, so a re-run makes none."""

import json

from dagster import AssetExecutionContext, AssetIn, AssetSelection, Config, Output, asset, define_asset_job, in_process_executor
from pydantic import Field, PositiveInt

from crucible_assets.caching import cached_artifact, key
from crucible_assets.suites.judge import judge_request, question_text, verdict
from crucible_assets.suites.prompts import as_prompt, render
from crucible_assets.tokenizing import read_stop
from resources.api_models.resource import ApiModelsResource
from resources.backends.resource import TrainingBackendResource
from resources.backends.types import SamplingParams
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.jsonl import read_jsonl, to_jsonl

GROUP = "api_data"


class LabelledPairsConfig(Config):
    num_prompts: PositiveInt = Field(default=200, description="training prompts of dpo's dataset answered and judged")
    max_tokens: PositiveInt = Field(default=48, description="each answer's budget")
    temperature: float = Field(default=1.0, gt=0.0, description="the policy's sampling temperature (two answers per prompt)")
    seed: int = 0


class TeacherConfig(Config):
    num_prompts: PositiveInt = Field(default=200, description="training prompts of chat_sl's dataset the teacher answers")
    max_tokens: PositiveInt = Field(default=256, description="the teacher's answer budget")
    temperature: float = Field(default=0.0, ge=0.0)


def training_prompts(dataset: ArtifactRef, limit: int) -> list:
    return [p for p in map(as_prompt, read_jsonl(dataset.dir / "train.jsonl")) if p is not None][:limit]


def usage_summary(report: dict) -> dict:
    return {f"api/{k}": v for k, v in report.items() if isinstance(v, (int, float))} | {"api/model": report["model"]}


@asset(key=key(GROUP, "labelled_pairs"), group_name=GROUP, code_version="1", kinds={"json"},
       ins={"dataset": AssetIn(key=key("dpo", "dataset")), "policy": AssetIn(key=key("dpo", "base_model")),
            "tokenized": AssetIn(key=key("dpo", "tokenized"))},
       description="DPO pairs labelled by a hosted judge: two sampled answers of dpo's starting model per prompt, kept when "
                   "the judge prefers the same one in both orders. Train on it: dpo__dataset source jsonl, path "
                   "<artifact>/pairs.jsonl.")
def labelled_pairs(context: AssetExecutionContext, config: LabelledPairsConfig, store: ArtifactStore,
                   backend: TrainingBackendResource, models: ApiModelsResource, dataset: ArtifactRef, policy: ArtifactRef,
                   tokenized: ArtifactRef) -> Output[ArtifactRef]:
    def build(out, _work):
        prompts = training_prompts(dataset, config.num_prompts)
        client = backend.create_training_client(policy.dir, 0, config.seed)
        renderer = json.loads((tokenized.dir / "render.json").read_text())["renderer"]
        params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed,
                                stop=read_stop(tokenized))
        groups = client.sample([render(client.tokenizer, renderer, p) for p in prompts], 2, params)
        answers = [[client.tokenizer.decode(s.tokens, skip_special_tokens=True).strip() for s in g] for g in groups]
        judge = models.client(store)
        questions = [question_text(p) for p in prompts]
        replies = judge.complete([judge_request(q, a, b, 8) for q, (a, b) in zip(questions, answers)] +
                                 [judge_request(q, b, a, 8) for q, (a, b) in zip(questions, answers)])
        n, pairs, dropped = len(prompts), [], {"same_answer": 0, "inconsistent": 0}
        for i, (p, (a, b)) in enumerate(zip(prompts, answers)):
            first, second = verdict(replies[i].text), verdict(replies[n + i].text)
            if a == b or not a or not b:
                dropped["same_answer"] += 1
            elif (first, second) in (("A", "B"), ("B", "A")):
                chosen, rejected = (a, b) if first == "A" else (b, a)
                pairs.append({"chosen": p.messages + [{"role": "assistant", "content": chosen}],
                              "rejected": p.messages + [{"role": "assistant", "content": rejected}]})
            else:
                dropped["inconsistent"] += 1
        (out / "pairs.jsonl").write_text(to_jsonl(pairs))
        return {"rows": len(pairs), "prompts": n, **{f"dropped_{k}": v for k, v in dropped.items()}, **usage_summary(judge.report())}

    return cached_artifact(context, store, config=config.model_dump(), build=build, backend=backend.identity(),
                           upstream={"dataset": dataset, "policy": policy, "tokenized": tokenized},
                           extra_inputs={"judge": {"provider": models.provider, "model": models.model}})


@asset(key=key(GROUP, "teacher_sft"), group_name=GROUP, code_version="1", kinds={"json"},
       ins={"dataset": AssetIn(key=key("chat_sl", "dataset"))},
       description="SFT conversations whose answers a hosted teacher wrote, for the prompts of chat_sl's dataset. Train on "
                   "it: chat_sl__dataset (or distillation's) source jsonl, path <artifact>/sft.jsonl.")
def teacher_sft(context: AssetExecutionContext, config: TeacherConfig, store: ArtifactStore, models: ApiModelsResource,
                dataset: ArtifactRef) -> Output[ArtifactRef]:
    def build(out, _work):
        prompts = training_prompts(dataset, config.num_prompts)
        teacher = models.client(store)
        replies = teacher.complete([{"messages": p.messages, "max_tokens": config.max_tokens, "temperature": config.temperature}
                                    for p in prompts])
        (out / "sft.jsonl").write_text(to_jsonl([{"messages": p.messages + [{"role": "assistant", "content": r.text.strip()}]}
                                                 for p, r in zip(prompts, replies)]))
        return {"rows": len(prompts), **usage_summary(teacher.report())}

    return cached_artifact(context, store, config=config.model_dump(), build=build, upstream={"dataset": dataset},
                           extra_inputs={"teacher": {"provider": models.provider, "model": models.model}})


assets = [labelled_pairs, teacher_sft]
# each with what it reads (cached ancestors cost nothing), as a recipe's job
jobs = [define_asset_job(name, selection=AssetSelection.assets(key(GROUP, name)).upstream(), executor_def=in_process_executor,
                         description=f"Materialize api_data/{name} (needs resources.models: a hosted model and its key).")
        for name in ("labelled_pairs", "teacher_sft")]
