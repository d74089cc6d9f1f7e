"""Distillation from a teacher into a (smaller) student on the shared training loop, read top
to bottom: config, the teacher's samples (an asset, cached per teacher and prompts), the
reverse-KL advantages, the off- and on-policy steps, evaluation, the algorithm.

Off-policy: cross-entropy on the teacher's own completions (sampled once, cached as an
asset with the teacher's log-probs). On-policy: the student samples, the teacher scores the
student's tokens, and the per-token reverse KL, log p_student - log p_teacher, enters the
importance-sampling loss as a negative advantage scaled by `kl_penalty_coef`; its gradient
is the gradient of the student's reverse KL to the teacher on the student's own states.
"""

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field, PositiveFloat, PositiveInt

from crucible_assets.caching import cached_artifact, key
from crucible_assets.evaluation import EvalConfig, bootstrap_ci, greedy_accuracy, paired_report
from crucible_assets.tokenizing import read_rows, read_stop
from crucible_assets.train.algorithm import Algorithm, EvalRun, TrainingRun
from crucible_assets.train.loop import Fraction, TrainConfig, layout_metrics, total_steps, train
from crucible_assets.train.rl import rl_datum
from resources.backends.resource import TrainingBackendResource
from resources.backends.types import Datum, SampledSequence, SamplingParams, TrainingClient
from resources.datasets.graders import GRADERS, Env
from resources.store.artifact_store import ArtifactRef, ArtifactStore


DistillMode = Literal["off_policy", "on_policy", "off_then_on"]


class DistillConfig(TrainConfig):
    mode: DistillMode = "off_then_on"
    off_policy_fraction: Fraction = Field(default=0.5, description="off_then_on: share of steps trained off-policy first")
    batch_size: PositiveInt = Field(default=32, description="prompts per step")
    group_size: PositiveInt = Field(default=4, description="on-policy: student samples per prompt")
    kl_penalty_coef: PositiveFloat = Field(default=1.0, description="on-policy: advantage = -coef * (log p_student - log p_teacher)")
    env: Env = Field(default="arithmetic", description="grader of the task metrics")
    max_tokens: PositiveInt = 16
    temperature: PositiveFloat = Field(default=1.0, description="student sampling temperature (on-policy)")
    eval_problems: int = Field(default=64, description="held-out prompts for the in-loop accuracy and KL")

    def on_policy_at(self, step: int, steps: int) -> bool:
        if self.mode != "off_then_on":
            return self.mode == "on_policy"
        return step >= round(self.off_policy_fraction * steps)



class TeacherSamplesConfig(Config):
    samples_per_prompt: PositiveInt = Field(default=2, description="teacher completions per training prompt")
    temperature: PositiveFloat = Field(default=1.0, description="1.0 samples the teacher's own distribution")
    max_tokens: PositiveInt = 16
    env: Env = Field(default="arithmetic", description="grader for the samples' correctness column")
    seed: int = 0


class DistillEvalConfig(EvalConfig):
    kl_samples: PositiveInt = Field(default=4, description="samples per held-out prompt for the mean per-token KL to the teacher")


def require_shared_tokenizer(teacher, student, teacher_ref: ArtifactRef, student_ref: ArtifactRef) -> None:
    """Token-level distillation compares log-probs of the same token ids: one vocabulary."""
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ValueError(f"teacher {teacher_ref.key} ({teacher_ref.dir}) and student {student_ref.key} ({student_ref.dir}) "
                         "have different tokenizers; distillation needs one shared vocabulary")


def teacher_samples_asset(recipe: str):
    @asset(key=key(recipe, "teacher_samples"), group_name=recipe, code_version="1", kinds={"parquet"},
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "teacher": AssetIn(key=key(recipe, "teacher")),
                "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The teacher's completions of every training prompt (seeded), with the teacher's per-token "
                       "log-probs; cached by teacher and prompt data versions, the off-policy training set.")
    def _teacher_samples(context: AssetExecutionContext, config: TeacherSamplesConfig, store: ArtifactStore,
                         backend: TrainingBackendResource, tokenized: ArtifactRef, teacher: ArtifactRef,
                         base_model: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            model = backend.create_training_client(teacher.dir, 0, config.seed)
            student = backend.create_training_client(base_model.dir, 0, config.seed)
            require_shared_tokenizer(model, student, teacher, base_model)
            rows = read_rows(tokenized, "train")
            prompts = [list(r["prompt_tokens"]) for r in rows]
            params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                                    stop=read_stop(tokenized), seed=config.seed)
            groups = model.sample(prompts, config.samples_per_prompt, params)
            kept = [(i, s) for i, group in enumerate(groups) for s in group if s.tokens]
            sequences = [prompts[i] + s.tokens for i, s in kept]
            teacher_lps = model.compute_logprobs(sequences)  # at T=1 whatever the sampling temperature
            correct = [GRADERS[config.env](model.tokenizer.decode(s.tokens, skip_special_tokens=True), rows[i]["reference"])[0]
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


def reverse_kl_advantages(student_lp_T: np.ndarray, teacher_lp_T: np.ndarray, coef: float) -> np.ndarray:
    """Per sampled token: -coef * (log p_student - log p_teacher). The tokens are the
    student's own samples, so the mean of the difference estimates KL(student || teacher)."""
    return -coef * (student_lp_T - teacher_lp_T)


def sample_and_score(student: TrainingClient, teacher: TrainingClient, rows: list[dict], num_samples: int,
                     params: SamplingParams) -> list[tuple[int, list[int], SampledSequence, np.ndarray]]:
    """Student samples; the teacher scores each sampled token: (row index, prompt, sample,
    teacher_lp_T). Empty samples (an immediate stop) carry no tokens to train and are dropped."""
    prompts = [list(r["prompt_tokens"]) for r in rows]
    groups = student.sample(prompts, num_samples, params)
    samples = [(i, prompts[i], s) for i, group in enumerate(groups) for s in group if s.tokens]
    teacher_lps = teacher.compute_logprobs([p + s.tokens for _, p, s in samples])
    return [(i, p, s, np.array(lp[len(p) - 1:])) for (i, p, s), lp in zip(samples, teacher_lps)]


def per_prompt_kl(student: TrainingClient, teacher: TrainingClient, rows: list[dict], cfg: DistillConfig,
                  stop: list[str], seed: int = 0) -> np.ndarray:
    """Mean per-token KL(model || teacher) of each prompt, estimated on one sample at T=1."""
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, stop=stop, seed=seed)
    kl_N = np.zeros(len(rows))
    for i, _, s, t_lp in sample_and_score(student, teacher, rows, 1, params):
        kl_N[i] = float(np.mean(np.array(s.logprobs) - t_lp))
    return kl_N


def train_distill(
    student: TrainingClient,
    teacher: TrainingClient,
    teacher_samples: list[dict],
    train_rows: list[dict],
    test_rows: list[dict],
    cfg: DistillConfig,
    stop: list[str],
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    """`teacher_samples`: rows of `prompt_index` (into `train_rows`), `tokens`, `weights` (1 on
    the teacher's completion) and `teacher_logprobs` (length len(tokens) - 1), one or more
    per prompt. Batches are drawn over prompts; a prompt with k samples serves them in turn."""
    steps = total_steps(cfg, len(train_rows))
    by_prompt: dict[int, list[dict]] = {}
    for sample in teacher_samples:
        by_prompt.setdefault(sample["prompt_index"], []).append(sample)

    def off_policy_step(step_no: int, indices: list[int]) -> dict:
        batch = [by_prompt[i][step_no % len(by_prompt[i])] for i in indices if i in by_prompt]
        total_weight = sum(sum(r["weights"][1:]) for r in batch)
        data = [Datum.from_sequence(r["tokens"], [w / total_weight for w in r["weights"]]) for r in batch]
        fb = student.forward_backward(data, "cross_entropy")
        mask = [np.array(r["weights"][1:]) > 0 for r in batch]
        student_lp = np.concatenate([out["logprobs"].numpy()[m] for out, m in zip(fb.loss_fn_outputs, mask)])
        teacher_lp = np.concatenate([np.array(r["teacher_logprobs"])[m] for r, m in zip(batch, mask)])
        # on the teacher's samples, the mean of log p_teacher - log p_student estimates KL(teacher || student)
        return {"distill_loss": fb.metrics["loss:sum"], "teacher_kl/forward": float((teacher_lp - student_lp).mean()),
                **layout_metrics(fb.metrics, [r["tokens"] for r in batch])}

    def on_policy_step(step_no: int, indices: list[int]) -> dict:
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, stop=stop,
                                seed=cfg.seed * 1_000_003 + step_no)
        rows = [train_rows[i] for i in indices]
        scored = sample_and_score(student, teacher, rows, cfg.group_size, params)
        n_sampled = sum(len(s.tokens) for _, _, s, _ in scored)
        data = [rl_datum(p, s, reverse_kl_advantages(np.array(s.logprobs), t_lp, cfg.kl_penalty_coef), 1.0 / n_sampled)
                for _, p, s, t_lp in scored]
        fb = student.forward_backward(data, "importance_sampling")
        kl_T = np.concatenate([np.array(s.logprobs) - t_lp for _, _, s, t_lp in scored])
        correct = [GRADERS[cfg.env](student.tokenizer.decode(s.tokens, skip_special_tokens=True), rows[i]["reference"])[0]
                   for i, _, s, _ in scored]
        return {"distill_loss": fb.metrics["loss:sum"], "teacher_kl": float(kl_T.mean()),
                "env/all/correct": float(np.mean(correct)), "env/all/ac_tokens_per_turn": n_sampled / len(scored),
                **layout_metrics(fb.metrics, [p + s.tokens for _, p, s, _ in scored])}

    def step(step_no: int, indices: list[int]) -> dict:
        on = cfg.on_policy_at(step_no, steps)
        return {"on_policy": int(on), **(on_policy_step(step_no, indices) if on else off_policy_step(step_no, indices))}

    eval_rows = test_rows[: cfg.eval_problems]

    def evaluate() -> dict:
        return {"test/accuracy": float(greedy_accuracy(student, student.tokenizer, eval_rows, GRADERS[cfg.env], cfg.max_tokens,
                                                       stop, cfg.seed).mean()),
                "test/teacher_kl": float(per_prompt_kl(student, teacher, eval_rows, cfg, stop).mean())}

    return train(student, len(train_rows), cfg, work_dir, step, evaluate, "distill_loss", log)


def train_run(run: TrainingRun) -> tuple[list[dict], dict]:
    teacher_ref, tokenized = run.inputs["teacher"], run.inputs["tokenized"]
    teacher = run.backend.create_training_client(teacher_ref.dir, 0, run.config.seed)
    require_shared_tokenizer(teacher, run.client, teacher_ref, run.inputs["base_model"])
    samples = pq.read_table(run.inputs["teacher_samples"].dir / "samples.parquet").to_pylist()
    return train_distill(run.client, teacher, samples, read_rows(tokenized, "train"), read_rows(tokenized, "test"),
                         run.config, read_stop(tokenized), run.work, run.log)


def evaluate_distill(run: EvalRun) -> dict:
    """Held-out prompts: greedy task accuracy of the student, the teacher and the starting
    student, and each student's mean per-token KL to the teacher (on `kl_samples` samples of
    its own per prompt), with paired bootstrap CIs of the student's gains over its start."""
    cfg, eval_cfg, rows, teacher, stop = run.train_config, run.config, run.rows, run.models["teacher"], run.stop
    tokenizer, grader = run.trained.tokenizer, GRADERS[cfg.env]

    def kl(model: TrainingClient) -> np.ndarray:
        return np.mean([per_prompt_kl(model, teacher, rows, cfg, stop, seed=eval_cfg.seed + k)
                        for k in range(eval_cfg.kl_samples)], axis=0)

    def accuracy(model: TrainingClient) -> np.ndarray:
        return greedy_accuracy(model, tokenizer, rows, grader, cfg.max_tokens, stop, cfg.seed)

    teacher_acc = accuracy(teacher)
    report = paired_report({
        "test/accuracy": (accuracy(run.trained), accuracy(run.start)),
        "test/teacher_kl": (kl(run.trained), kl(run.start)),
    }, eval_cfg)
    teacher_ci = bootstrap_ci(lambda idx: teacher_acc[idx].mean(), len(rows), eval_cfg.bootstrap_samples, eval_cfg.seed)
    return {"num_problems": len(rows), **report, "teacher/test/accuracy": float(teacher_acc.mean()),
            "teacher/test/accuracy_ci": teacher_ci}


ALGORITHM = Algorithm(
    name="distill",
    data_kind="problems",
    train_config=DistillConfig,
    eval_config=DistillEvalConfig,
    train=train_run,
    evaluate=evaluate_distill,
    loss_key="distill_loss",
    eval_key="test/teacher_kl",
    report_metric=("test/accuracy", "held-out greedy accuracy"),
    inputs=("teacher", "teacher_samples"),
    eval_models=("teacher",),
    model_stages=("teacher",),
    stages=(teacher_samples_asset,),
    plot_training_curve=True,
    checkpoint_version="4",  # 4: the loss curve names its Y axis
    eval_version="3",  # 2: report.md columns start, trained, gain (CI); 3: a verdict column
    checkpoint_description="The student distilled from the teacher: cross-entropy on the teacher's samples (off-policy), "
                           "reverse KL on its own samples scored by the teacher (on-policy), or one then the other.",
    eval_description="The distilled student vs. the teacher vs. the starting student on held-out prompts: "
                     "greedy task accuracy and mean per-token KL to the teacher, with paired bootstrap CIs.",
)
