"""distillation: a smaller student learns from a registered teacher, off-policy (cross-entropy
on the teacher's cached samples), on-policy (reverse KL to the teacher on the student's own
samples) or one then the other.

By default the teacher is math_rl's registered model and the student a freshly initialised
base/tiny_llama_small (a fifth of the teacher's parameters) on the same tokenizer, on
math_rl's arithmetic questions, holding out the same ones. `distillation__teacher` and `distillation__base_model` take
a local HF dir or hub id instead (they must share a tokenizer). Lineage: the registered
student is `distilled_from` the teacher, whose own lineage reaches its data."""

from pydantic import NonNegativeInt, PositiveInt

from crucible_assets.data import MaxLength, TokenizeConfig
from crucible_assets.recipe import Gate, Recipe
from crucible_assets.train import distill
from crucible_assets.train.loop import PositiveFinite
from resources.datasets.sources import DatasetConfig, Generator


class DistillDataset(DatasetConfig):
    generator: Generator = "arithmetic_problems"
    num_examples: NonNegativeInt = 2000
    test_fraction: float = 0.2  # math_rl's held-out questions: neither the teacher's chain nor the student trains on them


class DistillTokenize(TokenizeConfig):
    max_length: MaxLength = 256  # a prompt longer than this is never truncated: dropped (overlong: drop) or an error


class DistillTrain(distill.DistillConfig):
    mode: distill.DistillMode = "off_then_on"
    # measured (fp32, default chain): 1000 steps at 1e-3 take the student to the teacher's held-out
    # accuracy; 600 steps stop halfway, and 3e-3 overshoots (as it does for sl_basic)
    learning_rate: PositiveFinite = 1e-3
    batch_size: PositiveInt = 32
    max_steps: NonNegativeInt = 1000
    eval_every: PositiveInt = 250
    save_every: PositiveInt = 250


RECIPE = Recipe(
    name="distillation",
    algorithm=distill.ALGORITHM,
    base="tiny_llama_small",
    models={"teacher": "math_rl"},
    dataset=DistillDataset,
    tokenize=DistillTokenize,
    train=DistillTrain,
    gate=Gate("test/accuracy", higher_is_better=True),
    lineage_edge="distilled_from",
    lineage_stage="teacher",
)
