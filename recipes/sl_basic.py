"""sl_basic: supervised fine-tuning with cross-entropy on the target tokens.

Defaults train the embedded tiny Llama on seeded synthetic arithmetic chats in about a
minute on two CPU cores. Override any field with `-c overrides.yaml` (examples/)."""

from pydantic import NonNegativeInt, PositiveInt

from crucible_assets.data import MaxLength, TokenizeConfig
from crucible_assets.evaluation import EvalConfig
from crucible_assets.recipe import Gate, Recipe
from crucible_assets.train import sft
from crucible_assets.train.loop import PositiveFinite
from resources.datasets.sources import DatasetConfig


class SlBasicDataset(DatasetConfig):
    # 600 worked examples cover about half of the 610 questions (operands 0..19); math_rl then
    # learns from rewards on all of them, so RL meets questions SFT never showed it
    num_examples: NonNegativeInt = 600
    test_fraction: float = 0.2  # the same seeded share math_rl holds out, so neither stage trains on the other's test items


class SlBasicTokenize(TokenizeConfig):
    max_length: MaxLength = 128


class SlBasicTrain(sft.SftConfig):
    learning_rate: PositiveFinite = 1e-3
    batch_size: PositiveInt = 32
    max_steps: NonNegativeInt = 600
    eval_every: PositiveInt = 100
    save_every: PositiveInt = 100


class SlBasicEval(EvalConfig):
    max_tokens: PositiveInt = 16


RECIPE = Recipe(
    name="sl_basic",
    algorithm=sft.ALGORITHM,
    dataset=SlBasicDataset,
    tokenize=SlBasicTokenize,
    train=SlBasicTrain,
    evaluate=SlBasicEval,
    gate=Gate("test/nll", higher_is_better=False),
    lineage_edge="fine_tuned_from",
)
