"""chat_sl: chat SFT on multi-turn conversations, rendered with the model's chat template,
loss on the assistant turns only, packed rows.

By default it continues from sl_basic's registered model (lineage: chat_sl <- sl_basic <-
base) on seeded synthetic multi-turn arithmetic chats. Point `chat_sl__dataset` at a
tinker-cookbook conversation file, Tulu 3 or no_robots (examples/chat_sl_*.yaml)."""

from pydantic import NonNegativeInt, PositiveInt

from crucible_assets.data import MaxLength, TokenizeConfig
from crucible_assets.evaluation import EvalConfig
from crucible_assets.recipe import Gate, Recipe
from crucible_assets.rendering import TrainOn
from crucible_assets.train import sft
from crucible_assets.train.loop import PositiveFinite
from resources.datasets.sources import DatasetConfig, Generator


class ChatSlDataset(DatasetConfig):
    generator: Generator = "arithmetic_chat"
    num_examples: NonNegativeInt = 2000


class ChatSlTokenize(TokenizeConfig):
    max_length: MaxLength = 128
    train_on_what: TrainOn = "all_assistant_messages"


class ChatSlTrain(sft.SftConfig):
    learning_rate: PositiveFinite = 2e-3
    batch_size: PositiveInt = 32
    max_steps: NonNegativeInt = 200
    eval_every: PositiveInt = 50
    save_every: PositiveInt = 50


class ChatSlEval(EvalConfig):
    max_tokens: PositiveInt = 24


RECIPE = Recipe(
    name="chat_sl",
    algorithm=sft.ALGORITHM,
    start_from="sl_basic",
    dataset=ChatSlDataset,
    tokenize=ChatSlTokenize,
    train=ChatSlTrain,
    evaluate=ChatSlEval,
    gate=Gate("test/nll", higher_is_better=False),
    lineage_edge="fine_tuned_from",
)
