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
    num_examples: NonNegativeInt = 2000


class SlBasicTokenize(TokenizeConfig):
    max_length: MaxLength = 128


class SlBasicTrain(sft.SftConfig):
    learning_rate: PositiveFinite = 3e-3
    batch_size: PositiveInt = 32
    max_steps: NonNegativeInt = 300
    eval_every: PositiveInt = 50
    save_every: PositiveInt = 50


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
