"""sl_basic: supervised fine-tuning with cross-entropy on the target tokens.

Defaults train the embedded tiny Llama on seeded synthetic arithmetic chats in about a
minute on two CPU cores. Override any field with `-c overrides.yaml` (examples/)."""

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

NAME = "sl_basic"


class SlBasicDataset(DatasetConfig):
    num_examples: int = 2000


class SlBasicTokenize(TokenizeConfig):
    max_length: int = 128


class SlBasicTrain(SupervisedTrainConfig):
    learning_rate: float = 3e-3
    batch_size: int = 32
    max_steps: int = 300
    eval_every: int = 50
    save_every: int = 50


class SlBasicEval(EvalConfig):
    max_tokens: int = 16


assets = [
    base_model_asset(NAME),
    dataset_asset(NAME, SlBasicDataset),
    tokenized_asset(NAME, SlBasicTokenize),
    sft_checkpoint_asset(NAME, SlBasicTrain),
    sft_eval_report_asset(NAME, SlBasicEval),
    registered_model_asset(NAME, lineage_edge="fine_tuned_from"),
]
checks = [dataset_checks(NAME), length_check(NAME), eval_gate_check(NAME), promotion_gate_check(NAME)]
