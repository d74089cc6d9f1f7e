"""math_rl: RL with verifiable math rewards. Groups of sampled answers per problem are
graded, rewards centered within each group, and the sampled tokens trained with the
importance-sampling loss (or PPO).

By default it continues from sl_basic's registered model (lineage math_rl <- sl_basic <-
base) on sl_basic's one-digit arithmetic questions, graded on the last integer of the answer.
sl_basic's model answers them greedily but not yet reliably when it samples; RL sharpens it. GSM8K
and MATH load through `datasets` (examples/math_rl.yaml)."""

from crucible_assets.checks import dataset_checks, eval_gate_check, length_check, promotion_gate_check
from crucible_assets.rl import RlConfig
from crucible_assets.rl_stages import RlEvalConfig, rl_checkpoint_asset, rl_eval_report_asset
from crucible_assets.stages import TokenizeConfig, base_model_asset, dataset_asset, registered_model_asset, tokenized_asset
from resources.dataset_sources import DatasetConfig
from resources.problem_sources import validate_problem

NAME = "math_rl"


class MathRlDataset(DatasetConfig):
    generator: str = "one_digit_problems"
    num_examples: int = 2000


class MathRlTokenize(TokenizeConfig):
    max_length: int = 256  # prompts longer than this are an error, not a truncation


class MathRlTrain(RlConfig):
    # measured: sl_basic's model sits in a sharp minimum (its schedule decays to zero); Adam
    # steps above ~5e-5 undo more than the noisy policy gradient gains, so: small, constant, many
    learning_rate: float = 5e-5
    lr_schedule: str = "constant"
    batch_size: int = 32
    group_size: int = 8
    max_steps: int = 100
    eval_every: int = 25
    save_every: int = 25


assets = [
    base_model_asset(NAME, start_from="sl_basic"),
    dataset_asset(NAME, MathRlDataset, validate=validate_problem),
    tokenized_asset(NAME, MathRlTokenize, kind="problems"),
    rl_checkpoint_asset(NAME, MathRlTrain),
    rl_eval_report_asset(NAME, RlEvalConfig),
    registered_model_asset(NAME, lineage_edge="rl_trained_from", metric="test/sample_accuracy", lower_is_better=False),
]
checks = [dataset_checks(NAME, "problems"), length_check(NAME),
          eval_gate_check(NAME, delta="test/sample_accuracy_delta", higher_is_better=True), promotion_gate_check(NAME)]
