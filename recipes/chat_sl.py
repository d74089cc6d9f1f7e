"""chat_sl: chat SFT on multi-turn conversations, rendered with the model's chat template,
loss on the assistant turns only, packed rows.

By default it continues from sl_basic's registered model (lineage: chat_sl <- sl_basic <-
base) on seeded synthetic multi-turn arithmetic chats. Point `chat_sl__dataset` at a
tinker-cookbook conversation file, Tulu 3 or no_robots (examples/chat_sl_*.yaml)."""

from crucible_assets.checks import dataset_checks, eval_gate_check, length_check, promotion_gate_check
from crucible_assets.evaluation import EvalConfig
from crucible_assets.stages import (
    TokenizeConfig,
    base_model_asset,
    dataset_asset,
    registered_model_asset,
    sft_checkpoint_asset,
    sft_eval_report_asset,
    tokenized_asset,
)
from crucible_assets.supervised import SupervisedTrainConfig
from resources.dataset_sources import DatasetConfig

NAME = "chat_sl"


class ChatSlDataset(DatasetConfig):
    generator: str = "arithmetic_chat"
    num_examples: int = 2000


class ChatSlTokenize(TokenizeConfig):
    max_length: int = 128
    train_on_what: str = "all_assistant_messages"


class ChatSlTrain(SupervisedTrainConfig):
    learning_rate: float = 2e-3
    batch_size: int = 32
    max_steps: int = 200
    eval_every: int = 50
    save_every: int = 50


class ChatSlEval(EvalConfig):
    max_tokens: int = 24


assets = [
    base_model_asset(NAME, start_from="sl_basic"),
    dataset_asset(NAME, ChatSlDataset),
    tokenized_asset(NAME, ChatSlTokenize),
    sft_checkpoint_asset(NAME, ChatSlTrain),
    sft_eval_report_asset(NAME, ChatSlEval),
    registered_model_asset(NAME, lineage_edge="fine_tuned_from"),
]
checks = [dataset_checks(NAME), length_check(NAME), eval_gate_check(NAME), promotion_gate_check(NAME)]
