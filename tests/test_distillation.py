"""Distillation building blocks: the on-policy reverse-KL loss and its gradient against the
formula on a hand-made batch (padding contributing exactly zero), the mode schedule, the
shared-tokenizer guard and a few deterministic steps of each mode on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crucible_assets.base import build_tiny_llama, train_tokenizer
from crucible_assets.train.distill import require_shared_tokenizer
from crucible_assets.train.distill import DistillConfig, reverse_kl_advantages, train_distill
from crucible_assets.train.rl import rl_datum
from resources.datasets.synthetic import arithmetic_problems
from crucible_assets.tokenizing import Renderer, problem_row
from resources.store.artifact_store import ArtifactRef
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.types import SampledSequence


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    train_tokenizer(root / "tok", 1024, 0)
    build_tiny_llama(root / "tok", root / "teacher", 64, 2, 4, 128, 256, 1)
    build_tiny_llama(root / "tok", root / "student", 32, 1, 2, 64, 256, 0)
    return root


def _client(path):
    return LocalTorchBackend(device="cpu", precision="fp32").create_training_client(path, 0, 0)


def test_reverse_kl_advantages_hand_made():
    student_lp = np.array([-0.5, -2.0, -1.0])
    teacher_lp = np.array([-1.0, -1.0, -1.0])
    assert reverse_kl_advantages(student_lp, teacher_lp, 2.0).tolist() == [-1.0, 2.0, -0.0]


def test_on_policy_loss_and_gradient_equal_the_formula_and_padding_adds_nothing(tiny):
    """Two samples of different lengths share a padded (or packed) batch. The backend's
    importance-sampling loss on reverse-KL advantages must equal
    -sum_t exp(lp_t - lp_sampler_t) * A_t over sampled tokens, with A_t = -(lp_sampler_t - lp_teacher_t)/N,
    and its gradient must equal the sum of each sample's own gradient computed alone."""
    prompt = [1, 5, 9]
    samples = [SampledSequence([11, 12, 13, 14, 2], [-1.0, -2.0, -0.5, -3.0, -0.1], "stop"),
               SampledSequence([21, 2], [-0.7, -0.2], "stop")]
    teacher_lps = [np.array([-1.5, -1.0, -0.5, -2.0, -0.3]), np.array([-0.1, -0.9])]
    n = sum(len(s.tokens) for s in samples)
    data = [rl_datum(prompt, s, reverse_kl_advantages(np.array(s.logprobs), t, 1.0), 1.0 / n)
            for s, t in zip(samples, teacher_lps)]

    def grads(client):
        return torch.cat([p.grad.flatten() for p in client.model.parameters()])

    for packing in (True, False):
        client = LocalTorchBackend(device="cpu", precision="fp32", packing=packing).create_training_client(tiny / "student", 0, 0)
        fb = client.forward_backward(data, "importance_sampling")
        together = grads(client)
        expected = 0.0
        for s, t, out in zip(samples, teacher_lps, fb.loss_fn_outputs):
            lp = out["logprobs"].numpy()[len(prompt) - 1:]
            adv = -(np.array(s.logprobs) - t) / n
            expected += -(np.exp(lp - np.array(s.logprobs)) * adv).sum()
        assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)

        alone = torch.zeros_like(together)
        for d in data:
            client.model.zero_grad(set_to_none=True)
            client.forward_backward([d], "importance_sampling")
            alone += grads(client)
        assert torch.allclose(together, alone, atol=1e-7, rtol=1e-5)


def test_on_policy_gradient_matches_autograd_of_the_formula(tiny):
    client = _client(tiny / "student")
    prompt, sample = [1, 5, 9], SampledSequence([11, 12, 2], [-1.0, -2.0, -0.5], "stop")
    teacher_lp = np.array([-0.5, -1.0, -2.0])
    d = rl_datum(prompt, sample, reverse_kl_advantages(np.array(sample.logprobs), teacher_lp, 0.5), 1.0)
    client.forward_backward([d], "importance_sampling")
    backend_grad = torch.cat([p.grad.flatten() for p in client.model.parameters()])

    client.model.zero_grad(set_to_none=True)
    seq = torch.tensor([prompt + sample.tokens])
    logits = client.model(input_ids=seq[:, :-1]).logits
    lp_T = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, 1:, None])[0, :, 0][len(prompt) - 1:]
    adv_T = torch.tensor(-0.5 * (np.array(sample.logprobs) - teacher_lp), dtype=torch.float32)
    loss = -(torch.exp(lp_T - torch.tensor(sample.logprobs)) * adv_T).sum()
    loss.backward()
    formula_grad = torch.cat([p.grad.flatten() for p in client.model.parameters()])
    assert torch.allclose(backend_grad, formula_grad, atol=1e-6, rtol=1e-4)


def test_mode_schedule_and_config_errors():
    cfg = DistillConfig(mode="off_then_on", off_policy_fraction=0.25)
    assert [cfg.on_policy_at(s, 8) for s in range(8)] == [False, False, True, True, True, True, True, True]
    assert not any(DistillConfig(mode="off_policy").on_policy_at(s, 4) for s in range(4))
    assert all(DistillConfig(mode="on_policy").on_policy_at(s, 4) for s in range(4))
    for overrides, needle in [({"mode": "both"}, "mode"), ({"kl_penalty_coef": 0}, "kl_penalty_coef"),
                              ({"off_policy_fraction": 1.5}, "off_policy_fraction"), ({"group_size": 0}, "group_size")]:
        with pytest.raises(ValueError, match=needle):
            DistillConfig(**overrides).check()


def test_teacher_and_student_must_share_a_tokenizer(tiny, tmp_path):
    train_tokenizer(tmp_path / "other_tok", 600, 1)
    build_tiny_llama(tmp_path / "other_tok", tmp_path / "other", 32, 1, 2, 64, 256, 0)
    ref = lambda k, p: ArtifactRef(key=k, fingerprint="f", content_hash="c", path=str(p))  # noqa: E731
    require_shared_tokenizer(_client(tiny / "teacher"), _client(tiny / "student"),
                             ref("distillation/teacher", tiny / "teacher"), ref("distillation/base_model", tiny / "student"))
    with pytest.raises(ValueError, match="different tokenizers"):
        require_shared_tokenizer(_client(tiny / "teacher"), _client(tmp_path / "other"),
                                 ref("distillation/teacher", tiny / "teacher"), ref("distillation/base_model", tmp_path / "other"))


@pytest.mark.parametrize("mode", ["off_policy", "on_policy", "off_then_on"])
def test_distill_steps_are_deterministic_and_report_teacher_kl(tiny, tmp_path, mode):
    runs = []
    for attempt in range(2):
        teacher, student = _client(tiny / "teacher"), _client(tiny / "student")
        r = Renderer(student.tokenizer, 64, "last_assistant_message", "chat_template")
        rows = [problem_row(r, p, lambda: "x")[0] for p in arithmetic_problems(12, 3)]
        samples = []
        for i, row in enumerate(rows[:-2]):  # the last two prompts have no teacher sample: skipped off-policy
            tokens = list(row["prompt_tokens"]) + student.tokenizer.encode(f"{row['reference']}<|im_end|>", add_special_tokens=False)
            samples.append({"prompt_index": i, "tokens": tokens,
                            "weights": [0.0] * len(row["prompt_tokens"]) + [1.0] * (len(tokens) - len(row["prompt_tokens"]))})
        for s, lp in zip(samples, teacher.compute_logprobs([s["tokens"] for s in samples])):
            s["teacher_logprobs"] = lp
        cfg = DistillConfig(mode=mode, max_steps=4, batch_size=4, group_size=2, max_tokens=6, eval_every=4, save_every=2,
                            eval_problems=4)
        out, _ = train_distill(student, teacher, samples, rows, rows, cfg, ["<|im_end|>"],
                               tmp_path / f"{mode}{attempt}", lambda _: None)
        runs.append(out)
    on = [r["on_policy"] for r in runs[0]]
    assert on == {"off_policy": [0] * 4, "on_policy": [1] * 4, "off_then_on": [0, 0, 1, 1]}[mode]
    for row in runs[0]:
        assert ("teacher_kl" in row) == bool(row["on_policy"]) and ("teacher_kl/forward" in row) != bool(row["on_policy"])
    assert {"test/accuracy", "test/teacher_kl"} <= set(runs[0][-1])
    assert runs[0] == runs[1]
