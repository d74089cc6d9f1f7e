"""Asset factories for distillation's own stages: the teacher's completions (sampled once per
teacher and prompt set, with the teacher's log-probs), the distilled student checkpoint and
the student-vs-teacher-vs-start eval report."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field

from crucible_assets.caching import cached_artifact
from crucible_assets.distillation import DistillConfig, evaluate_distill, train_distill
from crucible_assets.evaluation import EvalConfig
from crucible_assets.math_grading import grade
from crucible_assets.placement import TRAINING_STEP
from crucible_assets.rl import ENVS
from crucible_assets.stages import eval_report_asset, key, read_examples, save_checkpoint, stop_of, tracked
from resources.artifact_store import ArtifactRef, ArtifactStore
from resources.backend import TrainingBackendResource
from resources.tracking import TrackingResource
from resources.training_backend import SamplingParams


class TeacherSamplesConfig(Config):
    samples_per_prompt: int = Field(default=2, description="teacher completions per training prompt")
    temperature: float = Field(default=1.0, description="1.0 samples the teacher's own distribution")
    max_tokens: int = 16
    env: str = Field(default="arithmetic", description="grader for the samples' correctness column")
    seed: int = 0


class DistillEvalConfig(EvalConfig):
    kl_samples: int = Field(default=4, description="samples per held-out prompt for the mean per-token KL to the teacher")


def require_shared_tokenizer(teacher, student, teacher_ref: ArtifactRef, student_ref: ArtifactRef) -> None:
    """Token-level distillation compares log-probs of the same token ids: one vocabulary."""
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ValueError(f"teacher {teacher_ref.key} ({teacher_ref.dir}) and student {student_ref.key} ({student_ref.dir}) "
                         "have different tokenizers; distillation needs one shared vocabulary")


def teacher_samples_asset(recipe: str, config_cls: type[TeacherSamplesConfig]):
    @asset(key=key(recipe, "teacher_samples"), group_name=recipe, code_version="1", kinds={"parquet"},
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "teacher": AssetIn(key=key(recipe, "teacher")),
                "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The teacher's completions of every training prompt (seeded), with the teacher's per-token "
                       "log-probs; cached by teacher and prompt data versions, the off-policy training set.")
    def _teacher_samples(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                         tokenized: ArtifactRef, teacher: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        if config.env not in ENVS or config.samples_per_prompt < 1 or config.max_tokens < 1 or config.temperature <= 0:
            raise ValueError(f"teacher_samples config: env in {ENVS}, samples_per_prompt, max_tokens >= 1 and "
                             f"temperature > 0 required, got {config.model_dump()}")

        def build(out, _work):
            model = backend.create_training_client(teacher.dir, 0, config.seed)
            student = backend.create_training_client(base_model.dir, 0, config.seed)
            require_shared_tokenizer(model, student, teacher, base_model)
            rows = read_examples(tokenized, "train")
            prompts = [list(r["prompt_tokens"]) for r in rows]
            params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                                    stop=stop_of(tokenized), seed=config.seed)
            groups = model.sample(prompts, config.samples_per_prompt, params)
            kept = [(i, s) for i, group in enumerate(groups) for s in group if s.tokens]
            sequences = [prompts[i] + s.tokens for i, s in kept]
            teacher_lps = model.compute_logprobs(sequences)  # at T=1 whatever the sampling temperature
            correct = [grade(config.env, model.tokenizer.decode(s.tokens, skip_special_tokens=True), rows[i]["reference"])[0]
                       for i, s in kept]
            pq.write_table(pa.table({
                "prompt_index": [i for i, _ in kept],
                "tokens": sequences,
                "weights": [[0.0] * len(prompts[i]) + [1.0] * len(s.tokens) for i, s in kept],
                "teacher_logprobs": [list(lp) for lp in teacher_lps],
                "correct": correct,
            }), out / "samples.parquet")
            return {"num_samples": len(kept), "num_prompts": len(rows), "teacher_sample_accuracy": float(np.mean(correct)),
                    "mean_completion_tokens": float(np.mean([len(s.tokens) for _, s in kept]))}

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"tokenized": tokenized, "teacher": teacher, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _teacher_samples


def distill_checkpoint_asset(recipe: str, config_cls: type[DistillConfig]):
    @asset(key=key(recipe, "checkpoint"), group_name=recipe, code_version="3", kinds={"pytorch", "huggingface"}, **TRAINING_STEP,
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model")),
                "teacher": AssetIn(key=key(recipe, "teacher")), "teacher_samples": AssetIn(key=key(recipe, "teacher_samples"))},
           description="The student distilled from the teacher: cross-entropy on the teacher's samples (off-policy), "
                       "reverse KL on its own samples scored by the teacher (on-policy), or one then the other.")
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                    tracking: TrackingResource, tokenized: ArtifactRef, base_model: ArtifactRef, teacher: ArtifactRef,
                    teacher_samples: ArtifactRef) -> Output[ArtifactRef]:
        config.check(context.asset_key.to_user_string())

        def build(out, work):
            student = backend.create_training_client(base_model.dir, config.lora_rank, config.seed)
            model = backend.create_training_client(teacher.dir, 0, config.seed)
            require_shared_tokenizer(model, student, teacher, base_model)
            samples = pq.read_table(teacher_samples.dir / "samples.parquet").to_pylist()
            rows, telemetry = train_distill(student, model, student.tokenizer, samples, read_examples(tokenized, "train"),
                                            read_examples(tokenized, "test"), config, stop_of(tokenized), work, context.log.info)
            return save_checkpoint(student, out, rows, telemetry, "distill_loss", "test/teacher_kl")

        output = cached_artifact(context, store, config=config.model_dump(),
                                 upstream={"tokenized": tokenized, "base_model": base_model, "teacher": teacher,
                                           "teacher_samples": teacher_samples},
                                 build=build, backend=backend.identity())
        return tracked(context, store, tracking, output)

    return _checkpoint


def distill_eval_report_asset(recipe: str, config_cls: type[DistillEvalConfig]):
    def evaluate(start, trained, rows, config, train_config, stop, teacher):
        return evaluate_distill(start, trained, teacher, trained.tokenizer, rows, DistillConfig(**train_config), config,
                                config.kl_samples, stop)

    return eval_report_asset(recipe, config_cls, evaluate, "test/accuracy", "held-out greedy accuracy",
                             curve=("distill_loss", "test/teacher_kl"), extra_models=("teacher",),
                             description="The distilled student vs. the teacher vs. the starting student on held-out prompts: "
                                         "greedy task accuracy and mean per-token KL to the teacher, with paired bootstrap CIs.")
