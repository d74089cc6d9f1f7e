"""Asset factories for math_rl's own stages: the RL checkpoint (sampling and training on
the backend) and the eval report (greedy accuracy and pass@k vs. the start)."""

from dagster import AssetExecutionContext, AssetIn, Output, asset
from pydantic import Field

from crucible_assets.caching import cached_artifact
from crucible_assets.evaluation import EvalConfig
from crucible_assets.placement import TRAINING_STEP
from crucible_assets.rl import RlConfig, evaluate_rl, train_rl
from crucible_assets.stages import eval_report_asset, key, read_examples, save_checkpoint, stop_of, tracked
from resources.artifact_store import ArtifactRef, ArtifactStore
from resources.backend import TrainingBackendResource
from resources.tracking import TrackingResource


class RlEvalConfig(EvalConfig):
    pass_k: int = Field(default=8, description="samples per problem (temperature 1) for pass@k")


def rl_checkpoint_asset(recipe: str, config_cls: type[RlConfig]):
    @asset(key=key(recipe, "checkpoint"), group_name=recipe, code_version="2", kinds={"pytorch", "huggingface"}, **TRAINING_STEP,
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="RL with verifiable rewards: groups of sampled answers per problem, group-centered rewards, "
                       "importance-sampling or PPO loss on the sampled tokens; HF model dir, state, metrics, reward curve.")
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                    tracking: TrackingResource, tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        config.check(context.asset_key.to_user_string())

        def build(out, work):
            client = backend.create_training_client(base_model.dir, config.lora_rank, config.seed)
            reference = backend.create_training_client(base_model.dir, 0, config.seed) if config.kl_penalty_coef > 0 else None
            rows, telemetry = train_rl(client, reference, client.tokenizer, read_examples(tokenized, "train"),
                                       read_examples(tokenized, "test"), config, stop_of(tokenized), work, context.log.info)
            return save_checkpoint(client, out, rows, telemetry, "env/all/reward/total", "test/accuracy")

        output = cached_artifact(context, store, config=config.model_dump(),
                                 upstream={"tokenized": tokenized, "base_model": base_model},
                                 build=build, backend=backend.identity())
        return tracked(context, store, tracking, output)

    return _checkpoint


def rl_eval_report_asset(recipe: str, config_cls: type[RlEvalConfig]):
    def evaluate(start, trained, rows, config, train_config, stop):
        return evaluate_rl(start, trained, trained.tokenizer, rows, RlConfig(**train_config), config, config.pass_k, stop)

    return eval_report_asset(recipe, config_cls, evaluate, "test/sample_accuracy", "held-out sample accuracy (T=1)",
                             code_version="2", curve=("env/all/reward/total", "test/accuracy"),
                             description="Greedy accuracy, sample accuracy and pass@k on held-out problems vs. the starting "
                                         "model, with paired bootstrap CIs, and the training reward curve.")
