"""Asset factories for DPO's own stages: the frozen reference's log-probs (computed once per
starting model and tokenized data), the DPO checkpoint and the preference eval report."""

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, Output, asset

from crucible_assets.caching import cached_artifact
from crucible_assets.evaluation import EvalConfig
from crucible_assets.placement import TRAINING_STEP
from crucible_assets.preference import DpoConfig, completion_logps, evaluate_preferences, train_dpo
from crucible_assets.stages import eval_report_asset, key, read_examples, save_checkpoint, tracked
from resources.artifact_store import ArtifactRef, ArtifactStore
from resources.backend import TrainingBackendResource
from resources.tracking import TrackingResource

REF_COLUMNS = ("chosen_logps", "chosen_tokens", "rejected_logps", "rejected_tokens")


def read_reference(reference: ArtifactRef, split: str) -> dict:
    table = pq.read_table(reference.dir / f"{split}.parquet")
    return {c: table.column(c).to_numpy() for c in REF_COLUMNS}


def reference_logprobs_asset(recipe: str):
    @asset(key=key(recipe, "reference_logprobs"), group_name=recipe, code_version="1", kinds={"parquet"},
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The frozen starting policy's summed completion log-probs for every pair, computed once per "
                       "starting model and tokenized data; training reads them instead of a second model.")
    def _reference(context: AssetExecutionContext, store: ArtifactStore, backend: TrainingBackendResource,
                   tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            client = backend.create_training_client(base_model.dir, 0, 0)
            summary = {}
            for split in ("train", "test"):
                logps = completion_logps(client, read_examples(tokenized, split))
                pq.write_table(pa.table({c: pa.array(logps[c], pa.float64()) for c in REF_COLUMNS}), out / f"{split}.parquet")
                summary[f"{split}_pairs"] = len(logps["chosen_logps"])
                summary[f"{split}/ref_logps/chosen"] = float(logps["chosen_logps"].mean())
                summary[f"{split}/ref_logps/rejected"] = float(logps["rejected_logps"].mean())
            return summary

        return cached_artifact(context, store, config={}, upstream={"tokenized": tokenized, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _reference


def dpo_checkpoint_asset(recipe: str, config_cls: type[DpoConfig]):
    @asset(key=key(recipe, "checkpoint"), group_name=recipe, code_version="2", kinds={"pytorch", "huggingface"}, **TRAINING_STEP,
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model")),
                "reference_logprobs": AssetIn(key=key(recipe, "reference_logprobs"))},
           description="DPO fine-tune of the starting model against its cached reference log-probs: HF model dir, "
                       "resumable optimizer state, per-step metrics (TRL names) and a loss curve.")
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                    tracking: TrackingResource, tokenized: ArtifactRef, base_model: ArtifactRef,
                    reference_logprobs: ArtifactRef) -> Output[ArtifactRef]:
        config.check(context.asset_key.to_user_string())

        def build(out, work):
            client = backend.create_training_client(base_model.dir, config.lora_rank, config.seed)
            rows, telemetry = train_dpo(client, read_examples(tokenized, "train"), read_reference(reference_logprobs, "train"),
                                        read_examples(tokenized, "test"), read_reference(reference_logprobs, "test"),
                                        config, work, context.log.info)
            return save_checkpoint(client, out, rows, telemetry, "dpo_loss", "test/dpo_loss")

        output = cached_artifact(context, store, config=config.model_dump(),
                                 upstream={"tokenized": tokenized, "base_model": base_model, "reference_logprobs": reference_logprobs},
                                 build=build, backend=backend.identity())
        return tracked(context, store, tracking, output)

    return _checkpoint


def dpo_eval_report_asset(recipe: str, config_cls: type[EvalConfig]):
    def evaluate(start, trained, rows, config, train_config, stop):
        return evaluate_preferences(start, trained, trained.tokenizer, rows, config, DpoConfig(**train_config), stop)

    return eval_report_asset(recipe, config_cls, evaluate, "test/pref_accuracy", "held-out preference accuracy",
                             description="Held-out preference accuracy (chosen log-prob above rejected) and implicit-reward "
                                         "margins vs. the starting policy, and greedy answer accuracy before and after, with bootstrap CIs.")
