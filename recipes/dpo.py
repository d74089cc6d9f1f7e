"""dpo: direct preference optimization with the reference log-probs cached as an asset.

By default it continues from chat_sl's registered model (lineage dpo <- chat_sl <- sl_basic
<- base) on seeded synthetic pairs: the same multi-turn arithmetic chats, with the right
last answer chosen over a near miss. Point `dpo__dataset` at HH-RLHF, UltraFeedback
binarized or HelpSteer3 preference data (examples/dpo.yaml)."""

from crucible_assets.checks import dataset_checks, eval_gate_check, length_check, promotion_gate_check
from crucible_assets.dpo_stages import dpo_checkpoint_asset, dpo_eval_report_asset, reference_logprobs_asset
from crucible_assets.evaluation import EvalConfig
from crucible_assets.preference import DpoConfig
from crucible_assets.stages import TokenizeConfig, base_model_asset, dataset_asset, registered_model_asset, tokenized_asset
from resources.dataset_sources import DatasetConfig
from resources.preference_sources import validate_pair

NAME = "dpo"


class DpoDataset(DatasetConfig):
    generator: str = "arithmetic_pairs"
    num_examples: int = 2000


class DpoTokenize(TokenizeConfig):
    max_length: int = 128
    train_on_what: str = "last_assistant_message"  # a pair's completion is its last assistant message


class DpoTrain(DpoConfig):
    # measured on the default chain: the NLL term on chosen (RPO) keeps the chosen answers'
    # likelihood up; without it the log-prob ranking of held-out pairs did not improve
    sft_weight: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 16
    max_steps: int = 120
    eval_every: int = 40
    save_every: int = 40


class DpoEval(EvalConfig):
    max_tokens: int = 24


assets = [
    base_model_asset(NAME, start_from="chat_sl"),
    dataset_asset(NAME, DpoDataset, validate=validate_pair),
    tokenized_asset(NAME, DpoTokenize, kind="pairs"),
    reference_logprobs_asset(NAME),
    dpo_checkpoint_asset(NAME, DpoTrain),
    dpo_eval_report_asset(NAME, DpoEval),
    registered_model_asset(NAME, lineage_edge="dpo_trained_from", metric="test/pref_accuracy", lower_is_better=False),
]
checks = [dataset_checks(NAME, "pairs"), length_check(NAME),
          eval_gate_check(NAME, delta="test/pref_accuracy_delta", higher_is_better=True), promotion_gate_check(NAME)]
