"""distillation: a smaller student learns from a registered teacher, off-policy (cross-entropy
on the teacher's cached samples), on-policy (reverse KL to the teacher on the student's own
samples) or one then the other.

By default the teacher is math_rl's registered model and the student a freshly initialised
base/tiny_llama_small (a fifth of the teacher's parameters) on the same tokenizer, on
math_rl's one-digit arithmetic questions. `distillation__teacher` and `distillation__base_model` take
a local HF dir or hub id instead (they must share a tokenizer). Lineage: the registered
student is `distilled_from` the teacher, whose own lineage reaches its data."""

from crucible_assets.checks import dataset_checks, eval_gate_check, length_check, promotion_gate_check
from crucible_assets.distill_stages import (DistillEvalConfig, TeacherSamplesConfig, distill_checkpoint_asset,
                                            distill_eval_report_asset, teacher_samples_asset)
from crucible_assets.distillation import DistillConfig
from crucible_assets.stages import TokenizeConfig, base_model_asset, dataset_asset, registered_model_asset, tokenized_asset
from resources.dataset_sources import DatasetConfig
from resources.problem_sources import validate_problem

NAME = "distillation"


class DistillDataset(DatasetConfig):
    generator: str = "one_digit_problems"
    num_examples: int = 2000


class DistillTokenize(TokenizeConfig):
    max_length: int = 256  # prompts longer than this are an error, not a truncation


class DistillTrain(DistillConfig):
    mode: str = "off_then_on"
    learning_rate: float = 3e-3
    batch_size: int = 32
    max_steps: int = 300
    eval_every: int = 50
    save_every: int = 50


assets = [
    base_model_asset(NAME, start_from="math_rl", stage="teacher"),
    base_model_asset(NAME, base="tiny_llama_small"),
    dataset_asset(NAME, DistillDataset, validate=validate_problem),
    tokenized_asset(NAME, DistillTokenize, kind="problems"),
    teacher_samples_asset(NAME, TeacherSamplesConfig),
    distill_checkpoint_asset(NAME, DistillTrain),
    distill_eval_report_asset(NAME, DistillEvalConfig),
    registered_model_asset(NAME, lineage_edge="distilled_from", metric="test/accuracy", lower_is_better=False,
                           lineage_stage="teacher"),
]
checks = [dataset_checks(NAME, "problems"), length_check(NAME),
          eval_gate_check(NAME, delta="test/accuracy_delta", higher_is_better=True), promotion_gate_check(NAME)]
