"""DPO building blocks: the losses and reward metrics against TRL's definitions computed
independently (numpy, float64), completion masking through the real backend, the pair
loaders for HH-RLHF, UltraFeedback binarized and HelpSteer3, and the pair checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crucible_assets.checks import _row, validate
from crucible_assets.train.dpo import DpoConfig, dpo_loss, on_policy_pair, reward_metrics, train_dpo
from resources.datasets.synthetic import arithmetic_pairs
from crucible_assets.tokenizing import Renderer, pair_row
from resources.datasets.sources import DatasetConfig, DatasetError, load_records
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.types import SampledSequence
from resources.datasets.pairs import validate_pair

# a fixed batch of summed completion log-probs (policy and reference, chosen and rejected)
PC = np.array([-12.5, -3.25, -40.0, -7.0, -0.5])
PR = np.array([-14.0, -2.75, -39.0, -9.5, -6.0])
RC = np.array([-13.0, -3.0, -41.5, -7.0, -1.0])
RR = np.array([-13.5, -3.0, -38.0, -8.0, -5.0])


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def trl_reference(loss_type: str, beta: float, ls: float = 0.0):
    """TRL DPOTrainer.dpo_loss, written out from its definition."""
    logits = (PC - PR) - (RC - RR)
    if loss_type == "sigmoid":
        losses = -_log_sigmoid(beta * logits) * (1 - ls) - _log_sigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen, rejected = beta * (PC - RC), beta * (PR - RR)
    return {"dpo_loss": losses.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).mean(),
            "logps/chosen": PC.mean(), "logps/rejected": PR.mean()}


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("hinge", 0.1, 0.0),
                                               ("hinge", 2.0, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)])
def test_losses_and_metrics_equal_trl_definitions(loss_type, beta, ls):
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    metrics = reward_metrics(*dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, loss_type, ls), t(PC), t(PR))
    expected = trl_reference(loss_type, beta, ls)
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    # the hand-made batch really exercises each branch
    assert 0 < expected["rewards/accuracies"] < 1


def test_sigmoid_loss_hand_computed():
    # one pair, logits = (0 - -1) - (0 - 0) = 1, beta 1: loss = log(1 + e^-1)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = dpo_loss(t(0.0), t(-1.0), t(0.0), t(0.0), 1.0, "sigmoid")
    assert losses.item() == pytest.approx(np.log1p(np.exp(-1.0)), abs=1e-12)
    assert chosen.item() == 0.0 and rejected.item() == -1.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_step_metrics_use_completion_tokens_only(tiny, tmp_path, loss_type):
    """One DPO step through the backend: its loss equals the formula applied to log-probs
    summed over the completion tokens alone (IPO: averaged), computed independently; the
    logged rewards and log-probs are on the sums for every loss type (TRL's convention)."""
    backend = LocalTorchBackend(device="cpu", precision="fp32")
    client = backend.create_training_client(tiny, 0, 0)
    renderer = Renderer(client.tokenizer, 128, "last_assistant_message", "chat_template")
    rows = [pair_row(renderer, p, lambda: "x")[0] for p in arithmetic_pairs(6, 1)]
    logps, counts = {}, {}
    for side in ("chosen", "rejected"):
        per_token = client.compute_logprobs([r[f"{side}_tokens"] for r in rows])
        weights = [np.array(r[f"{side}_weights"][1:]) for r in rows]
        assert all(0 < w.sum() < len(w) / 3 for w in weights)  # the prompt is most of the sequence, and masked
        logps[side] = np.array([np.dot(lp, w) for lp, w in zip(per_token, weights)])
        counts[side] = np.array([w.sum() for w in weights])
    ref = {"chosen_logps": logps["chosen"] + 0.3, "rejected_logps": logps["rejected"] - 0.2,
           "chosen_tokens": counts["chosen"], "rejected_tokens": counts["rejected"]}
    cfg = DpoConfig(max_steps=1, batch_size=6, learning_rate=1e-4, beta=0.5, loss_type=loss_type, eval_every=1, save_every=1)
    out, _ = train_dpo(client, rows, ref, rows, ref, cfg, tmp_path, lambda _: None)
    if loss_type == "ipo":
        pc, pr = logps["chosen"] / counts["chosen"], logps["rejected"] / counts["rejected"]
        rc, rr = ref["chosen_logps"] / counts["chosen"], ref["rejected_logps"] / counts["rejected"]
    else:
        pc, pr, rc, rr = logps["chosen"], logps["rejected"], ref["chosen_logps"], ref["rejected_logps"]
    logits = (pc - pr) - (rc - rr)
    expected_loss = (-_log_sigmoid(0.5 * logits) if loss_type == "sigmoid" else (logits - 1.0) ** 2).mean()
    assert out[0]["dpo_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert out[0]["rewards/chosen"] == pytest.approx((0.5 * (logps["chosen"] - ref["chosen_logps"])).mean(), abs=1e-5)
    assert out[0]["logps/rejected"] == pytest.approx(logps["rejected"].mean(), abs=1e-5)
    assert out[0]["num_pairs"] == 6 and "test/dpo_loss" in out[0]


# ---------------------------------------------------------------------------------------
# pair datasets
# ---------------------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hh_rlhf_transcripts(tmp_path):
    path = _jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4\n\nHuman: Sure?\n\nAssistant: Yes, 4.",
        "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4\n\nHuman: Sure?\n\nAssistant: No, 5.",
    }] * 3)
    records = load_records(DatasetConfig(source="hf", path="json", data_files=[str(path)]), validate_pair)
    assert records[0]["chosen"][:-1] == records[0]["rejected"][:-1]
    assert [m["role"] for m in records[0]["chosen"]] == ["user", "assistant", "user", "assistant"]
    assert records[0]["rejected"][-1]["content"] == "No, 5."


def test_ultrafeedback_binarized_parquet(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "prompt_id": "p", "score_chosen": 8.0, "score_rejected": 3.0,
             "chosen": PROMPT + [{"role": "assistant", "content": "4"}],
             "rejected": PROMPT + [{"role": "assistant", "content": "5"}]}] * 4
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs-00000.parquet")
    records = load_records(DatasetConfig(source="hf", path="parquet", data_files=[str(tmp_path / "train_prefs-00000.parquet")]),
                           validate_pair)
    assert records[0] == {"chosen": rows[0]["chosen"], "rejected": rows[0]["rejected"]}


def test_helpsteer3_preference(tmp_path):
    base = {"domain": "general", "language": "english", "context": PROMPT, "response1": "4", "response2": "5"}
    path = _jsonl(tmp_path / "hs3.jsonl", [{**base, "overall_preference": -2}, {**base, "overall_preference": 0},
                                           {**base, "overall_preference": 3}])
    records = load_records(DatasetConfig(source="jsonl", path=str(path)), validate_pair)
    assert len(records) == 2  # the tie is dropped
    assert records[0]["chosen"][-1]["content"] == "4" and records[1]["chosen"][-1]["content"] == "5"


@pytest.mark.parametrize("record,needle", [
    ({"chosen": PROMPT + [{"role": "assistant", "content": "4"}]}, "line 1: field 'rejected': missing"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": 5}]},
     "line 1: field 'rejected[0].content'"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "4"}], "rejected": PROMPT + [{"role": "assistant", "content": "5"}, PROMPT[0]]},
     "field 'rejected': the last message must be the assistant's reply"),
    ({"context": PROMPT, "response1": "4", "response2": "5", "overall_preference": "high"}, "field 'overall_preference'"),
    ({"chosen": "no turns here", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "field 'chosen': transcript must start"),
])
def test_bad_pairs_name_file_record_and_field(tmp_path, record, needle):
    path = _jsonl(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(DatasetError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
        load_records(DatasetConfig(source="jsonl", path=str(path)), validate_pair)
    assert str(path) in str(e.value)


def _pair_frame(pairs):
    return pd.DataFrame([_row("train", p) for p in pairs])


def test_pair_checks_pass_on_synthetic_pairs():
    results = validate(_pair_frame(arithmetic_pairs(30, 0)))
    assert set(results) >= {"shared_prompt", "chosen_differs_from_rejected", "non_empty_completions"}
    assert all(ok for ok, _ in results.values()), {k: v for k, (ok, v) in results.items() if not ok}


@pytest.mark.parametrize("mutate,failing", [
    (lambda p: {**p, "rejected": [{"role": "user", "content": "other"}] + p["rejected"][-1:]}, "shared_prompt"),
    (lambda p: {**p, "rejected": p["chosen"]}, "chosen_differs_from_rejected"),
    (lambda p: {**p, "rejected": p["rejected"][:-1] + [{"role": "assistant", "content": "  "}]}, "non_empty_completions"),
])
def test_pair_checks_fail(mutate, failing):
    pairs = arithmetic_pairs(10, 0)
    pairs[3] = mutate(pairs[3])
    results = validate(_pair_frame(pairs))
    assert not results[failing][0]
    assert all(ok for name, (ok, _) in results.items() if name != failing)


ROW = {"prompt_tokens": [5, 6, 7], "reference": "3 + 4 = 7", "chosen_tokens": [5, 6, 7, 40, 41], "chosen_weights": [0, 0, 0, 1, 1],
       "rejected_tokens": [5, 6, 7, 40, 42], "rejected_weights": [0, 0, 0, 1, 1]}


def _sample(tokens, stop_reason="stop", logprob=-1.0):
    return SampledSequence(tokens=tokens, logprobs=[logprob] * len(tokens), stop_reason=stop_reason)


def test_on_policy_pair_rejects_the_models_likeliest_wrong_answer_over_its_likeliest_right_one():
    samples = [_sample([40, 41], "length", -0.1), _sample([50], logprob=-3.0), _sample([40, 41, 9], logprob=-0.5),
               _sample([51, 52], logprob=-1.0), _sample([40, 43], logprob=-0.9)]
    pair = on_policy_pair(ROW, samples, [True, False, True, False, True])
    # wrong answers: [50] (log-prob -3) and [51, 52] (-2): the likelier is rejected
    assert pair["rejected_tokens"] == [5, 6, 7, 51, 52] and pair["rejected_weights"] == [0, 0, 0, 1, 1]
    # right answers: [40, 41] ran out of tokens; of the two that ended, [40, 41, 9] (-1.5) beats [40, 43] (-1.8)
    assert pair["chosen_tokens"] == [5, 6, 7, 40, 41, 9] and pair["chosen_weights"] == [0, 0, 0, 1, 1, 1]
    assert pair["prompt_tokens"] == ROW["prompt_tokens"] and pair["reference"] == ROW["reference"]


def test_on_policy_pair_keeps_the_datasets_chosen_when_the_model_never_got_it_right():
    pair = on_policy_pair(ROW, [_sample([50]), _sample([40, 41], "length")], [False, True])
    assert pair["chosen_tokens"] == ROW["chosen_tokens"] and pair["rejected_tokens"] == [5, 6, 7, 50]


def test_no_on_policy_pair_when_the_model_made_no_mistake():
    assert on_policy_pair(ROW, [_sample([40, 41]), _sample([40, 41])], [True, True]) is None
