"""math_rl building blocks: grouped advantages on hand-made groups, masks on sampled tokens
only, sampler log-probs against a fresh forward pass, the graders on tricky answers, the
problem loaders, config errors, and a few deterministic RL steps on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resources.datasets.graders import grade, last_boxed, math_equal
from crucible_assets.train.rl import RlConfig, group_advantages, rl_datum, train_rl
from resources.datasets.synthetic import arithmetic_problems
from crucible_assets.tokenizing import Renderer, problem_row
from resources.datasets.sources import DatasetConfig, DatasetError, load_records
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.losses import ppo
from resources.datasets.problems import validate_problem
from resources.backends.types import SampledSequence, SamplingParams


def test_group_advantages_hand_made():
    assert group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), False).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert np.allclose(group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), True), [1, -1, -1, 1])
    assert group_advantages(np.array([0.9, 0.9, 0.9]), True).tolist() == [0.0, 0.0, 0.0]
    # format penalty: correct + 0.1 * (formatted - 1)
    rewards = np.array([1.0, 0.0, -0.1, 0.0])
    assert np.allclose(group_advantages(rewards, False), rewards - 0.225)


def test_rl_datum_masks_the_prompt():
    sample = SampledSequence(tokens=[7, 8, 9], logprobs=[-0.5, -1.0, -2.0], stop_reason="stop")
    d = rl_datum([1, 2, 3, 4], sample, np.array([0.5, 0.5, 0.25]), scale=2.0)
    assert d.model_input == [1, 2, 3, 4, 7, 8]
    assert d.loss_fn_inputs["target_tokens"] == [2, 3, 4, 7, 8, 9]
    assert d.loss_fn_inputs["weights"] == [0, 0, 0, 1, 1, 1]
    assert d.loss_fn_inputs["logprobs"] == [0, 0, 0, -0.5, -1.0, -2.0]
    assert d.loss_fn_inputs["advantages"] == [0, 0, 0, 1.0, 1.0, 0.5]


def test_ppo_clip_fraction_counts_sampled_tokens_only():
    lp = torch.tensor([[-3.0, -1.0, -1.0]])  # prompt position has ratio e^-3: not a clip
    inputs = {"logprobs": torch.tensor([[0.0, -1.5, -1.0]]), "advantages": torch.tensor([[0.0, 1.0, -1.0]]),
              "weights": torch.tensor([[0.0, 1.0, 1.0]]), "mask": torch.ones(1, 3)}
    loss, metrics = ppo(lp, inputs, {})
    ratio = np.exp(0.5)  # > 1.2: clipped for the positive advantage
    assert loss.item() == pytest.approx(-(min(ratio * 1.0, 1.2 * 1.0) + (1.0 * -1.0)))
    assert metrics["clip_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("env,completion,reference,correct,formatted", [
    ("math", "so \\boxed{\\frac{1}{2}}", "0.5", True, True),
    ("math", "\\boxed{0.5}", "\\frac{1}{2}", True, True),
    ("math", "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True, True),
    ("math", "\\boxed{\\dfrac{2}{4}}", "\\frac12", True, True),
    ("math", "\\boxed{x^{2}+1}", "1+x^2", True, True),
    ("math", "first \\boxed{3} then \\boxed{4}", "4", True, True),
    ("math", "\\boxed{\\frac{1}{3}}", "0.33", False, True),
    ("math", "the answer is 4", "4", False, False),
    ("math", "\\boxed{\\frac{1}{2}", "0.5", False, False),
    ("gsm8k", "She has 1,000 apples.", "Some work\n#### 1,000", True, True),
    ("gsm8k", "I think 72. Or 73.", "#### 72", False, True),
    ("gsm8k", "no idea", "#### 5", False, False),
    ("arithmetic", "23 + 5 = 28", "28", True, True),
    ("arithmetic", "23 + 5 = -28", "28", False, True),
    ("arithmetic", "", "28", False, False),
])
def test_graders_on_tricky_answers(env, completion, reference, correct, formatted):
    assert grade(env, completion, reference) == (correct, formatted)


def test_last_boxed_matches_nested_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("none") is None
    assert math_equal("1,000", "1000")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_problem_loaders(tmp_path):
    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 + 4 apples. How many?", "answer": "3 + 4 = 7\n#### 7"}] * 3)
    assert load_records(DatasetConfig(source="hf", path="json", data_files=[str(gsm)]), validate_problem)[0] == \
        {"question": "Tom has 3 + 4 apples. How many?", "answer": "7"}
    math = _jsonl(tmp_path / "math.jsonl", [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
                                             "level": "Level 1", "type": "Algebra"}] * 2)
    assert load_records(DatasetConfig(source="jsonl", path=str(math)), validate_problem)[0]["answer"] == "\\frac{1}{2}"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"problem": "x", "solution": "no box"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 1: field 'solution': no \\boxed"):
        load_records(DatasetConfig(source="jsonl", path=str(bad)), validate_problem)
    bad = _jsonl(tmp_path / "bad2.jsonl", [{"question": "x", "answer": ["7"]}])
    with pytest.raises(DatasetError, match="line 1: field 'answer': expected a string or number, got list"):
        load_records(DatasetConfig(source="jsonl", path=str(bad)), validate_problem)


@pytest.mark.parametrize("overrides,needle", [
    ({"group_size": 1}, "group_size\n  Input should be greater than or equal to 2"),
    ({"kl_penalty_coef": 0.1}, "set kl_reference: base_model"),  # a rule across two fields
    ({"env": "chess"}, "env\n  Input should be 'arithmetic', 'gsm8k' or 'math'"),
    ({"temperature": 0.0}, "temperature\n  Input should be greater than 0"),
    ({"learning_rate": -1.0}, "learning_rate\n  Input should be greater than 0"),
])
def test_rl_config_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        RlConfig(**overrides).check()


def _rows(tok, n):
    r = Renderer(tok, 64, "last_assistant_message", "chat_template")
    return [problem_row(r, p, lambda: "x")[0] for p in arithmetic_problems(n, 3)]


def test_sampler_logprobs_match_a_fresh_forward_pass(tiny):
    client = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)
    rows = _rows(client.tokenizer, 4)
    prompts = [list(r["prompt_tokens"]) for r in rows]
    groups = client.sample(prompts, 3, SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    sequences = [(p, s) for p, g in zip(prompts, groups) for s in g]
    fresh = client.compute_logprobs([p + s.tokens for p, s in sequences])
    for (p, s), lp in zip(sequences, fresh):
        assert len(s.tokens) == len(s.logprobs) >= 1
        assert np.abs(np.array(lp[len(p) - 1:]) - np.array(s.logprobs)).max() < 1e-4


def test_rl_steps_are_deterministic_and_named_like_tinker_cookbook(tiny, tmp_path):
    names = {"env/all/reward/total", "env/all/correct", "env/all/format", "env/all/by_group/frac_mixed",
             "env/all/by_group/frac_all_good", "env/all/by_group/frac_all_bad", "optim/kl_sample_train_v1",
             "optim/entropy", "env/all/ac_tokens_per_turn", "learning_rate"}
    runs = []
    for attempt in range(2):
        client = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)
        reference = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)
        rows = _rows(client.tokenizer, 12)
        cfg = RlConfig(max_steps=3, batch_size=4, group_size=4, max_tokens=6, eval_every=3, save_every=2,
                       eval_problems=4, kl_penalty_coef=0.05, kl_reference="base_model", loss_fn="ppo")
        out, telemetry = train_rl(client, reference, rows, rows, cfg, ["<|im_end|>"],
                                  tmp_path / f"run{attempt}", lambda _: None)
        runs.append(out)
    assert names <= set(runs[0][0]) and "test/accuracy" in runs[0][-1]
    assert abs(runs[0][0]["optim/kl_sample_train_v1"]) < 1e-4  # on-policy: sampler and learner agree
    assert telemetry["time/sample"] > 0 and "time/sample" not in runs[0][0]  # wall clock stays out of metrics
    assert runs[0] == runs[1]
