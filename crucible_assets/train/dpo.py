"""DPO, read top to bottom: config, the loss, the pairs (sampled on-policy from the starting
model and labelled by a verifier, or as given: an asset), the frozen reference's log-probs
(an asset of their own, computed once per starting model and pairs), the update step on the
shared loop, the held-out evaluation, the algorithm.

Shape suffixes: _P one value per pair of the batch, _2P the chosen sides then the rejected
ones, _N per training pair (the cached reference).

A completion's log-prob is the sum over its loss-weighted tokens (the last assistant
message and its end-of-turn token; prompt and padding masked). IPO uses the per-token
average instead, for policy and reference alike, as TRL does.
"""

from pathlib import Path
from typing import Annotated, Callable, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from crucible_assets.caching import cached_artifact, key
from crucible_assets.evaluation import EvalConfig, nll_per_example, paired_report, sampled_accuracy
from crucible_assets.tokenizing import SCHEMAS, read_rows, read_stop
from crucible_assets.train.algorithm import Algorithm, EvalRun, TrainingRun
from crucible_assets.train.loop import PositiveFinite, TrainConfig, layout_metrics, train
from resources.backends.resource import TrainingBackendResource
from resources.backends.types import Datum, SampledSequence, SamplingParams, TrainingClient
from resources.datasets.graders import GRADERS
from resources.store.artifact_store import ArtifactRef, ArtifactStore

LossType = Literal["sigmoid", "ipo", "hinge"]
PairSource = Literal["on_policy", "as_given"]
Verifier = Literal[tuple(GRADERS)]
REF_COLUMNS = ("chosen_logps", "chosen_tokens", "rejected_logps", "rejected_tokens")


class DpoConfig(TrainConfig):
    beta: PositiveFinite = Field(default=0.1, description="strength of the implicit KL to the reference")
    loss_type: LossType = "sigmoid"
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(default=0.0, description="sigmoid only: assumed label noise (cDPO, Mitchell 2023; "
                                                                                        "TRL 1.16's sigmoid loss has no such term)")
    sft_weight: NonNegativeFloat = Field(default=0.0, description="weight of an added NLL term on the chosen completion (RPO, Pang et al. "
                                                                                  "2024; in TRL 1.16 the `sft` loss type beside `sigmoid`)")


def dpo_loss(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta: float, loss_type: str,
             label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards beta * (policy - reference) of each side, on the
    logits z = (pi_c - pi_r) - (ref_c - ref_r) of summed completion log-probs:

        sigmoid  -log sigmoid(beta z) (1 - eps) - log sigmoid(-beta z) eps   (Rafailov et al. 2023, DPO;
                                                                             eps: label smoothing, cDPO)
        ipo      (z - 1 / (2 beta))^2   on per-token mean log-probs         (Azar et al. 2023, IPO)
        hinge    max(0, 1 - beta z)                                         (SLiC, Zhao et al. 2023)
    """
    import torch
    import torch.nn.functional as F

    logits_P = (policy_chosen_P - policy_rejected_P) - (ref_chosen_P - ref_rejected_P)
    if loss_type == "sigmoid":
        losses_P = -F.logsigmoid(beta * logits_P) * (1 - label_smoothing) - F.logsigmoid(-beta * logits_P) * label_smoothing
    elif loss_type == "hinge":
        losses_P = torch.relu(1 - beta * logits_P)
    elif loss_type == "ipo":
        losses_P = (logits_P - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {get_args(LossType)}")
    return (losses_P, *implicit_rewards(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta))


def implicit_rewards(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta: float):
    """beta * (policy - reference) of each side. The logged metrics take them on summed
    log-probs whatever the loss averages (IPO), as TRL does."""
    return beta * (policy_chosen_P - ref_chosen_P).detach(), beta * (policy_rejected_P - ref_rejected_P).detach()


class PairsConfig(Config):
    source: PairSource = Field(default="on_policy", description="on_policy: the starting model answers each prompt and the "
                                                                "verifier labels its answers; as_given: the dataset's own pairs")
    verifier: Verifier = Field(default="conversation", description="on_policy: grades a sampled answer against the "
                                                                   "chosen answer (the reference)")
    samples_per_prompt: PositiveInt = Field(default=4, description="on_policy: answers sampled per prompt")
    temperature: PositiveFloat = 1.0
    max_tokens: PositiveInt = 24
    seed: int = 0


def on_policy_pair(row: dict, samples: list[SampledSequence], correct: list[bool]) -> dict | None:
    """A pair from the starting model's own answers (on-policy preference data, as in online
    DPO and RLHF's sampled comparisons): rejected is its most probable wrong answer, the
    mistake it is surest of; chosen its most probable right answer that ended on its own (else
    the dataset's chosen). None when it made no mistake: the dataset's pair stands in, so
    every held-out prompt keeps its row."""
    def most_probable(candidates: list[SampledSequence]) -> SampledSequence | None:
        return max(candidates, key=lambda s: sum(s.logprobs), default=None)

    wrong = most_probable([s for s, ok in zip(samples, correct) if not ok])
    if wrong is None:
        return None
    right = most_probable([s for s, ok in zip(samples, correct) if ok and s.stop_reason == "stop"])
    prompt = list(row["prompt_tokens"])
    pair = {**row, "rejected_tokens": prompt + wrong.tokens, "rejected_weights": [0.0] * len(prompt) + [1.0] * len(wrong.tokens)}
    if right is not None:
        pair |= {"chosen_tokens": prompt + right.tokens, "chosen_weights": [0.0] * len(prompt) + [1.0] * len(right.tokens)}
    return pair


SAMPLE_CHUNK = 256  # prompts per sampling call


def pairs_asset(recipe: str):
    @asset(key=key(recipe, "pairs"), group_name=recipe, code_version="1", kinds={"parquet"},
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The preference pairs DPO trains and is judged on. on_policy (default): the starting model "
                       "answers every prompt (train and held-out) a few times, a verifier grades the answers, and a "
                       "wrong answer becomes the rejected side (a right one, or the dataset's, the chosen side), so the "
                       "pairs hold the mistakes this model makes; prompts it never got wrong keep the dataset's pair. "
                       "as_given: the dataset's pairs unchanged (human preference data with no verifier).")
    def _pairs(context: AssetExecutionContext, config: PairsConfig, store: ArtifactStore, backend: TrainingBackendResource,
               tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        def sample(client, rows: list[dict], split: str) -> list[list[SampledSequence]]:
            """In chunks, each with its own seed, so memory stays bounded and the log shows progress."""
            groups, stop = [], read_stop(tokenized)
            for start in range(0, len(rows), SAMPLE_CHUNK):
                params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                                        stop=stop, seed=config.seed + start)
                groups += client.sample([list(r["prompt_tokens"]) for r in rows[start:start + SAMPLE_CHUNK]],
                                        config.samples_per_prompt, params)
                context.log.info(f"{split}: sampled {len(groups)}/{len(rows)} prompts x {config.samples_per_prompt}")
            return groups

        def build(out, _work):
            client = backend.create_training_client(base_model.dir, 0, config.seed)
            summary = {"source": config.source}
            for split in ("train", "test"):
                rows = read_rows(tokenized, split)
                if config.source == "on_policy":
                    groups = sample(client, rows, split)
                    grade = GRADERS[config.verifier]
                    correct = [[grade(client.tokenizer.decode(s.tokens, skip_special_tokens=True), r["reference"])[0]
                                for s in group] for r, group in zip(rows, groups)]
                    made = [on_policy_pair(r, g, c) for r, g, c in zip(rows, groups, correct)]
                    summary[f"{split}_on_policy_pairs"] = sum(p is not None for p in made)
                    summary[f"{split}/start_sample_accuracy"] = float(np.mean(correct))
                    rows = [p or r for p, r in zip(made, rows)]
                pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["pairs"]), out / f"{split}.parquet")
                summary[f"{split}_pairs"] = len(rows)
            return summary

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"tokenized": tokenized, "base_model": base_model}, build=build,
                               backend=backend.identity() if config.source == "on_policy" else None)

    return _pairs


def reward_metrics(losses_P, chosen_rewards_P, rejected_rewards_P, policy_chosen_P, policy_rejected_P, prefix: str = "") -> dict:
    """TRL's names: dpo_loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}."""
    return {
        f"{prefix}dpo_loss": losses_P.mean().item(),
        f"{prefix}rewards/chosen": chosen_rewards_P.mean().item(),
        f"{prefix}rewards/rejected": rejected_rewards_P.mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards_P - rejected_rewards_P).mean().item(),
        f"{prefix}rewards/accuracies": (chosen_rewards_P > rejected_rewards_P).float().mean().item(),
        f"{prefix}logps/chosen": policy_chosen_P.detach().mean().item(),
        f"{prefix}logps/rejected": policy_rejected_P.detach().mean().item(),
    }


def completion_logps(client: TrainingClient, rows: list[dict]) -> dict[str, np.ndarray]:
    """Summed completion log-probs and completion token counts of both sides of each pair."""
    out = {}
    for side in ("chosen", "rejected"):
        nll, count = nll_per_example(client, [(r[f"{side}_tokens"], r[f"{side}_weights"]) for r in rows])
        out[f"{side}_logps"], out[f"{side}_tokens"] = -nll, count
    return out


def _scores(logps: dict, ipo: bool) -> tuple[np.ndarray, np.ndarray]:
    if ipo:
        return logps["chosen_logps"] / logps["chosen_tokens"], logps["rejected_logps"] / logps["rejected_tokens"]
    return logps["chosen_logps"], logps["rejected_logps"]


def read_reference(reference: ArtifactRef, split: str) -> dict:
    table = pq.read_table(reference.dir / f"{split}.parquet")
    return {c: table.column(c).to_numpy() for c in REF_COLUMNS}


def reference_logprobs_asset(recipe: str):
    @asset(key=key(recipe, "reference_logprobs"), group_name=recipe, code_version="1", kinds={"parquet"},
           ins={"pairs": AssetIn(key=key(recipe, "pairs")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The frozen starting policy's summed completion log-probs for every pair, computed once per "
                       "starting model and tokenized data; training reads them instead of a second model.")
    def _reference(context: AssetExecutionContext, store: ArtifactStore, backend: TrainingBackendResource,
                   pairs: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            client = backend.create_training_client(base_model.dir, 0, 0)
            summary = {}
            for split in ("train", "test"):
                logps = completion_logps(client, read_rows(pairs, split))
                pq.write_table(pa.table({c: pa.array(logps[c], pa.float64()) for c in REF_COLUMNS}), out / f"{split}.parquet")
                summary[f"{split}_pairs"] = len(logps["chosen_logps"])
                summary[f"{split}/ref_logps/chosen"] = float(logps["chosen_logps"].mean())
                summary[f"{split}/ref_logps/rejected"] = float(logps["rejected_logps"].mean())
            return summary

        return cached_artifact(context, store, config={}, upstream={"pairs": pairs, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _reference


def train_dpo(
    client: TrainingClient,
    train_rows: list[dict],
    train_ref: dict[str, np.ndarray],
    test_rows: list[dict],
    test_ref: dict[str, np.ndarray],
    cfg: DpoConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    import torch

    ipo = cfg.loss_type == "ipo"
    ref_chosen_N, ref_rejected_N = (torch.tensor(x) for x in _scores(train_ref, ipo))
    ref_sums_chosen_N, ref_sums_rejected_N = (torch.tensor(x) for x in _scores(train_ref, ipo=False))

    def step(_step: int, indices: list[int]) -> dict:
        batch = [train_rows[i] for i in indices]
        P = len(batch)
        sequences = [(r[f"{side}_tokens"], r[f"{side}_weights"]) for side in ("chosen", "rejected") for r in batch]
        data = [Datum.from_sequence(t, w) for t, w in sequences]
        weights = [torch.tensor(d.loss_fn_inputs["weights"]) for d in data]

        def loss_fn(_data, logprobs):
            dev = logprobs[0].device
            sums_2P = torch.stack([(lp.double() * w.to(dev)).sum() for lp, w in zip(logprobs, weights)])
            counts_2P = torch.tensor([w.sum().item() for w in weights], dtype=torch.float64, device=dev)
            scores_2P = sums_2P / counts_2P if ipo else sums_2P
            losses_P, _, _ = dpo_loss(scores_2P[:P], scores_2P[P:], ref_chosen_N[indices].to(dev),
                                      ref_rejected_N[indices].to(dev), cfg.beta, cfg.loss_type, cfg.label_smoothing)
            loss = losses_P.mean()
            rewards = implicit_rewards(sums_2P[:P], sums_2P[P:], ref_sums_chosen_N[indices].to(dev),
                                       ref_sums_rejected_N[indices].to(dev), cfg.beta)
            metrics = reward_metrics(losses_P, *rewards, sums_2P[:P], sums_2P[P:])
            if cfg.sft_weight:
                nll = -sums_2P[:P].sum() / counts_2P[:P].sum()
                loss = loss + cfg.sft_weight * nll
                metrics["sft_nll"] = nll.item()
            return loss.float(), metrics

        fb = client.forward_backward_custom(data, loss_fn)
        return {**{k: v for k, v in fb.metrics.items() if ":" not in k}, "num_pairs": P,
                **layout_metrics(fb.metrics, [t for t, _ in sequences])}

    def evaluate() -> dict:
        policy = completion_logps(client, test_rows)
        return held_out_metrics(policy, test_ref, cfg, prefix="test/")

    return train(client, len(train_rows), cfg, work_dir, step, evaluate, "dpo_loss", log)


def held_out_metrics(policy: dict, ref: dict, cfg: DpoConfig, prefix: str) -> dict:
    import torch

    ipo = cfg.loss_type == "ipo"
    (pc, pr), (rc, rr) = (tuple(torch.tensor(x) for x in _scores(d, ipo)) for d in (policy, ref))
    losses_P, _, _ = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    (pc, pr), (rc, rr) = (tuple(torch.tensor(x) for x in _scores(d, ipo=False)) for d in (policy, ref))
    return reward_metrics(losses_P, *implicit_rewards(pc, pr, rc, rr, cfg.beta), pc, pr, prefix=prefix)


def evaluate_dpo(run: EvalRun) -> dict:
    """Held-out pairs, with the start as the reference, asked of each model itself:
    `test/logp_margin`, the mean of its summed completion log-prob of chosen minus rejected
    (in nats; its gain is the implicit reward margin divided by beta), and
    `test/pref_accuracy`, the share of pairs it ranks right (a tie counting half). Both are
    behaviours the start has too; TRL's implicit-reward `rewards/accuracies` is fixed at 0 for
    the start (policy = reference) and is reported beside them, not compared. Greedy answer
    accuracy before and after completes the report (the gate's guard)."""
    start, trained, rows, cfg, dpo = run.start, run.trained, run.rows, run.config, run.train_config
    policy, reference = completion_logps(trained, rows), completion_logps(start, rows)
    (pc, pr), (rc, rr) = (_scores(d, ipo=False) for d in (policy, reference))
    ranked = lambda logps: (logps["chosen_logps"] > logps["rejected_logps"]) + 0.5 * (logps["chosen_logps"] == logps["rejected_logps"])  # noqa: E731
    per_pair = {
        "test/logp_margin": (policy["chosen_logps"] - policy["rejected_logps"], reference["chosen_logps"] - reference["rejected_logps"]),
        "test/pref_accuracy": (ranked(policy).astype(float), ranked(reference).astype(float)),
        "test/rewards/margins": (dpo.beta * ((pc - rc) - (pr - rr)), np.zeros(len(rows))),
    }
    report: dict = {"num_pairs": len(rows), **held_out_metrics(policy, reference, dpo, prefix="test/"), **paired_report(per_pair, cfg)}
    return report | sampled_accuracy(start, trained, trained.tokenizer, rows, cfg, run.stop)


def train_run(run: TrainingRun) -> tuple[list[dict], dict]:
    pairs, reference = run.inputs["pairs"], run.inputs["reference_logprobs"]
    return train_dpo(run.client, read_rows(pairs, "train"), read_reference(reference, "train"),
                     read_rows(pairs, "test"), read_reference(reference, "test"), run.config, run.work, run.log)


ALGORITHM = Algorithm(
    name="dpo",
    data_kind="pairs",
    train_config=DpoConfig,
    eval_config=EvalConfig,
    train=train_run,
    evaluate=evaluate_dpo,
    loss_key="dpo_loss",
    eval_key="test/dpo_loss",
    report_metric=("test/logp_margin", "held-out log-prob margin, chosen - rejected (nats)"),
    inputs=("pairs", "reference_logprobs"),
    held_out="pairs",
    eval_version="3",  # 3: the model's own margin and ranking on the pairs stage's held-out split; a verdict column
    stages=(pairs_asset, reference_logprobs_asset),
    checkpoint_description="DPO fine-tune of the starting model against its cached reference log-probs: HF model dir, "
                           "resumable optimizer state, per-step metrics (TRL names) and a loss curve.",
    eval_description="The model's own held-out log-prob margin (chosen minus rejected) and preference accuracy "
                     "(chosen above rejected) vs. the starting model's, implicit-reward margins, and greedy answer "
                     "accuracy before and after, with paired bootstrap CIs.",
)
