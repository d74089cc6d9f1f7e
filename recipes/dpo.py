"""dpo: direct preference optimization with the reference log-probs cached as an asset.

By default it continues from chat_sl's champion (lineage dpo <- chat_sl <- sl_basic <- base)
on on-policy pairs (`dpo/pairs`): chat_sl's model answers seeded multi-turn arithmetic chats
whose follow-ups add 10..19 (it practised adding digits only) four times each, the verifier
grades the answers, and a wrong one becomes the rejected side (its own right answer, or the
dataset's, the chosen side); prompts it never got wrong keep the dataset's near-miss pair.
The gate asks the model itself to separate held-out pairs better.
Point `dpo__dataset` at HH-RLHF, UltraFeedback binarized or HelpSteer3 preference data with
`dpo__pairs: {config: {source: as_given}}` (examples/dpo.yaml)."""

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from crucible_assets.data import MaxLength, TokenizeConfig
from crucible_assets.evaluation import EvalConfig
from crucible_assets.recipe import Gate, Guard, Recipe
from crucible_assets.rendering import TrainOn
from crucible_assets.train import dpo
from crucible_assets.train.loop import PositiveFinite
from resources.datasets.sources import DatasetConfig, Generator


class DpoDataset(DatasetConfig):
    generator: Generator = "tens_pairs"  # follow-ups add 10..19: chat_sl trained on adding digits only
    num_examples: NonNegativeInt = 2000


class DpoTokenize(TokenizeConfig):
    max_length: MaxLength = 128
    train_on_what: TrainOn = "last_assistant_message"  # a pair's completion is its last assistant message


class DpoTrain(dpo.DpoConfig):
    # measured on on-policy pairs (fp32): without the NLL term on chosen (RPO) both sides'
    # likelihood fell and greedy accuracy with them (0.85 -> 0.61 at beta 0.5); on the default
    # tens_pairs 400 steps at 1e-4 took greedy accuracy 0.055 -> 0.935 and the margin's gain CI
    # to [51.2, 57.1] nats
    sft_weight: NonNegativeFloat = 1.0
    learning_rate: PositiveFinite = 1e-4
    batch_size: PositiveInt = 16
    max_steps: NonNegativeInt = 400
    eval_every: PositiveInt = 100
    save_every: PositiveInt = 100


class DpoEval(EvalConfig):
    max_tokens: PositiveInt = 24


RECIPE = Recipe(
    name="dpo",
    algorithm=dpo.ALGORITHM,
    start_from="chat_sl",
    dataset=DpoDataset,
    tokenize=DpoTokenize,
    train=DpoTrain,
    evaluate=DpoEval,
    # primary: the model's own held-out log-prob margin, chosen - rejected (its start is measured,
    # not fixed by construction as the implicit reward's is); preferences may not be learnt at
    # the expense of answering: greedy accuracy no worse than -0.02
    gate=Gate("test/logp_margin", higher_is_better=True, guards=(Guard("test/accuracy", margin=0.02),)),
    lineage_edge="dpo_trained_from",
)
