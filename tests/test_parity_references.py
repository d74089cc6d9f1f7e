"""Parity with the reference libraries themselves, imported and run on the inputs our code
gets, so that a parity claim in the docs rests on the references' code and not on our
transcription of it (tests/test_dpo.py checks the formulas against a transcription):

- TRL 1.16 `DPOTrainer.compute_loss` (loss types sigmoid, ipo, hinge, and the sft term that
  TRL 1.16 adds to sigmoid for RPO) on the same tiny policy and reference weights and the
  same token ids as `train_dpo`'s step with our cached reference log-probs;
- TRL 1.16 `SFTTrainer.compute_loss` on a padding-free batch (every sequence in one row,
  restarted position ids) against the local backend's packed `cross_entropy`, loss and
  gradients, and TRL's own assistant-only tokenization against our weights;
- tinker-cookbook 0.6.1: its `role_colon` renderer (and `qwen3_instruct`, which writes the
  ChatML our base tokenizer's template writes) token for token, its supervised datum and
  mean NLL, its group-centred RL advantages and datums, its KL penalty, its DPO loss.

Precision and tolerance. Both sides run fp32 on the same weights and token ids, so
per-token log-probs differ only in reduction order (TRL: a right-padded batch, log-softmax
in chunks in its fused LM head; ours: packed rows under a 4-D block-diagonal mask,
F.cross_entropy over the full logits), a few fp32 ulps per token. Sums add more: TRL sums a
completion's log-probs in fp32, our DPO step in fp64 (dpo.py casts before summing), and this
batch's sums reach about -170 (24 tokens), where one fp32 ulp is 1.5e-5; TRL logs logps/* as
means of such sums (about -55 here). Hence `close`: 1e-5 absolute for quantities of order
one (losses, rewards, advantages, where sums enter as beta-scaled differences averaged over
the batch) and 1e-5 relative above that (the logps/* means). Rounding stays 5x or more
under the bound, while a real disagreement (a token more or less, a mean for a sum) moves
these numbers by 1e-2 or more. Measured here (2 x86 cores, fp32): DPO losses and rewards
within 1.9e-6 (tinker-cookbook's DPO metrics within 7e-7), logps/* within 8e-7 (1.6e-8
relative), SFT mean NLL within 9.6e-7 and every gradient entry within 3.8e-8, RL
advantages within 2.4e-8.

Installing the references: `trl==1.16.*` is in the `test` extra. tinker-cookbook 0.6.1
requires `tml-renderers>=0.4.1`, which PyPI does not serve to these machines (0.2.1 is the
newest any platform gets); releases 0.2.0-0.5.8 pin transformers <= 5.5.4 (we run 5.24), and
0.1.0 pulls 27 more packages (inspect-ai, TextArena, ...) and moves fsspec and s3fs back a
release. So .ci/run installs tinker-cookbook 0.6.1 `--no-deps` after the README's set-up,
and the `test` extra lists what the imported modules load (chz, blobfile, termcolor); none
of them loads `tml_renderers`. Under CI=true a missing or differently-versioned reference fails these
tests; elsewhere they skip and say how to install it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import skip_or_fail_under_ci
from crucible_assets.base import CHATML_TEMPLATE
from crucible_assets.rendering import prompt_and_reference, render, stop_sequences
from crucible_assets.tokenizing import Renderer, pair_row
from crucible_assets.train.dpo import DpoConfig, completion_logps, dpo_loss, reward_metrics, train_dpo
from crucible_assets.train.loop import TrainConfig
from crucible_assets.train.rl import GroupRollout, RlConfig, group_advantages, rl_datum, token_advantages
from crucible_assets.train.sft import train_sft
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.types import Datum, SamplingParams
from resources.datasets.synthetic import arithmetic_chats, arithmetic_conversations, arithmetic_pairs

# TRL 1.16 asks transformers 5 for a name transformers deprecates; nothing here to act on
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TRL_VERSION, COOKBOOK_VERSION = "1.16.", "0.6.1"
INSTALL = "pip install -c constraints-cpu.txt -e '.[test]' && pip install --no-deps tinker-cookbook==0.6.1"
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


def assert_close(what: str, ours: float, theirs: float) -> None:
    print(f"{what}: ours {ours:.9g} reference {theirs:.9g} |diff| {abs(ours - theirs):.2e}")
    assert close(ours, theirs), f"{what}: ours {ours!r}, reference {theirs!r}"


def _reference_library(module: str, distribution: str, version: str):
    """The parity claims are about these releases: another version is as good as none."""
    try:
        found = importlib.metadata.version(distribution)
        if not found.startswith(version):
            raise ImportError(f"{distribution} {found} is installed, these tests check {version}")
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail_under_ci(f"{e}; install the references with `{INSTALL}`")


@pytest.fixture(scope="module")
def trl():
    return _reference_library("trl", "trl", TRL_VERSION)


@pytest.fixture(scope="module")
def cookbook():
    return _reference_library("tinker_cookbook", "tinker-cookbook", COOKBOOK_VERSION)


@pytest.fixture(scope="module")
def quiet_transformers():
    """The trainers log their set-up at warning level; the rest of the session keeps its level."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    yield
    transformers_logging.set_verbosity(level)


def _sharpened(source: Path, out: Path, seed: int) -> Path:
    """An untrained tiny model predicts almost uniformly, so policy and reference would agree
    to ~0.01 nats and every DPO loss would sit at its value for equal models; seeded noise and
    3x embeddings (logits scale with them: tied) spread the log-ratios over a few nats."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.get_input_embeddings().weight.mul_(3.0)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policy_and_reference(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_models")
    return _sharpened(tiny, root / "policy", 1), _sharpened(tiny, root / "reference", 2)


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _backend(**settings) -> LocalTorchBackend:
    return LocalTorchBackend(device="cpu", precision="fp32", **settings)


# ---------------------------------------------------------------------------------------
# TRL 1.16 DPOTrainer
# ---------------------------------------------------------------------------------------

UNEVEN_PAIRS = [  # completions of different lengths: IPO's per-token means and the SFT token mean see them
    {"chosen": [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "7 + 5 = 12"}],
     "rejected": [{"role": "user", "content": "What is 7 + 5?"},
                  {"role": "assistant", "content": "7 + 5 = 13, I think, not sure"}]},
    {"chosen": [{"role": "user", "content": "What is 9 - 4?"}, {"role": "assistant", "content": "9 - 4 = 5, as 4 + 5 = 9"}],
     "rejected": [{"role": "user", "content": "What is 9 - 4?"}, {"role": "assistant", "content": "6"}]},
]


def _completion_split(tokens: list[int], weights: list[float]) -> tuple[list[int], list[int]]:
    """(prompt, completion) of a pair side: our weights are one run of ones (the last
    assistant message and its end-of-turn token) after the prompt."""
    on = [i for i, w in enumerate(weights) if w]
    assert weights[on[0]: on[-1] + 1] == [1.0] * len(on), "a pair side's weights are not one contiguous completion"
    return tokens[: on[0]], tokens[on[0]: on[-1] + 1]


@pytest.fixture(scope="module")
def dpo_batch(policy_and_reference):
    """One batch for both sides: TRL gets exactly the tokens our weights select, and the
    reference log-probs are completion_logps', the function whose output our cached
    reference asset stores (TRL recomputes them from the reference weights)."""
    policy, reference = policy_and_reference
    ref_client = _backend().create_training_client(reference, 0, 0)
    renderer = Renderer(ref_client.tokenizer, 256, "last_assistant_message", "chat_template")
    records = arithmetic_pairs(4, 1) + UNEVEN_PAIRS
    rows = [pair_row(renderer, r, lambda: "parity pair")[0] for r in records]
    examples = []
    for row in rows:
        prompt, chosen = _completion_split(row["chosen_tokens"], row["chosen_weights"])
        prompt_r, rejected = _completion_split(row["rejected_tokens"], row["rejected_weights"])
        assert prompt == prompt_r
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    assert len({len(e["chosen_ids"]) - len(e["rejected_ids"]) for e in examples}) > 1
    ref = completion_logps(ref_client, rows)
    policy_logps = completion_logps(_backend().create_training_client(policy, 0, 0), rows)
    logits = (policy_logps["chosen_logps"] - policy_logps["rejected_logps"]) - (ref["chosen_logps"] - ref["rejected_logps"])
    return {"records": records, "rows": rows, "examples": examples, "ref": ref, "policy": policy_logps, "logits": logits}


@pytest.fixture(scope="module")
def trl_dpo(trl, quiet_transformers, policy_and_reference, dpo_batch, tmp_path_factory):
    """TRL's own loss code on our token ids. Fresh weights per trainer, since DPOTrainer
    patches its models' forward (its fused LM head); fp32 without autocast or activation
    checkpointing (TRL's CPU defaults are bf16 and checkpointing), and an explicit reference
    model, which TRL 1.16 needs for an in-memory policy. Cached: a configuration runs once."""
    from datasets import Dataset

    policy, reference = policy_and_reference
    conversations = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:],
                                        "rejected": r["rejected"][-1:]} for r in dpo_batch["records"]])
    runs = {}

    def run(loss_type: tuple[str, ...], beta: float, loss_weights: tuple[float, ...] | None = None,
            label_smoothing: float = 0.0):
        key = (loss_type, beta, loss_weights, label_smoothing)
        if key not in runs:
            args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_dpo")), beta=beta, loss_type=list(loss_type),
                                 loss_weights=list(loss_weights) if loss_weights else None, label_smoothing=label_smoothing,
                                 bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True, report_to=[],
                                 max_length=None, disable_tqdm=True, save_strategy="no")
            trainer = trl.DPOTrainer(model=_hf_model(policy), ref_model=_hf_model(reference), args=args,
                                     train_dataset=conversations, processing_class=_tokenizer(policy))
            trainer.model.train()
            loss = trainer.compute_loss(trainer.model, trainer.data_collator(dpo_batch["examples"]))
            runs[key] = loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, trainer
        return runs[key]

    return run


@pytest.fixture(scope="module")
def our_dpo(policy_and_reference, dpo_batch, tmp_path_factory):
    """train_dpo's own step, not a re-derivation of its loss: its first step's metrics are
    computed before the update, on the weights TRL sees. Cached: a configuration runs once."""
    policy, _ = policy_and_reference
    rows, ref = dpo_batch["rows"], dpo_batch["ref"]
    runs = {}

    def run(**config) -> dict:
        key = tuple(sorted(config.items()))
        if key not in runs:
            cfg = DpoConfig(max_steps=1, batch_size=len(rows), learning_rate=1e-4, eval_every=1, save_every=1, **config)
            client = _backend().create_training_client(policy, 0, 0)
            out, _ = train_dpo(client, rows, ref, rows[:1], {k: v[:1] for k, v in ref.items()}, cfg,
                               tmp_path_factory.mktemp("our_dpo"), lambda _: None)
            runs[key] = out[0]
        return runs[key]

    return run


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 1.0), ("hinge", 1.0)])
def test_dpo_loss_and_metrics_match_trl(trl_dpo, our_dpo, dpo_batch, loss_type, beta):
    loss, theirs, _ = trl_dpo((loss_type,), beta)
    ours = our_dpo(beta=beta, loss_type=loss_type)
    assert_close(f"{loss_type} dpo_loss", ours["dpo_loss"], loss)
    for name in REWARD_METRICS:
        assert_close(f"{loss_type} {name}", ours[name], theirs[name])
    # the batch exercises both regimes of each loss: pairs ranked right and wrong, and for
    # hinge pairs past the margin (zero loss) and inside it
    margins = beta * dpo_batch["logits"]
    assert (margins > 0).any() and (margins < 0).any()
    assert (margins >= 1).any() and (margins < 1).any()


def test_dpo_ipo_loss_matches_trl(trl_dpo, our_dpo):
    """TRL divides each side's log-ratio by its completion length (its IPO comment: confirmed
    with the IPO authors); we average policy and reference log-probs per token before taking
    the ratio, the same number. The batch has completions of unequal length, so a sum-based
    IPO would not match."""
    loss, _, _ = trl_dpo(("ipo",), 0.5)
    ours = our_dpo(beta=0.5, loss_type="ipo")
    assert_close("ipo dpo_loss", ours["dpo_loss"], loss)


def test_dpo_ipo_reward_metrics_match_trl(trl_dpo, our_dpo):
    """IPO averages log-probs per token in its loss, but the logged rewards/* and logps/* are
    on summed log-probs for every loss type, in TRL and here (this suite found them per-token)."""
    _, theirs, _ = trl_dpo(("ipo",), 0.5)
    ours = our_dpo(beta=0.5, loss_type="ipo")
    assert all(close(ours[name], theirs[name]) for name in REWARD_METRICS), {n: (ours[n], theirs[n]) for n in REWARD_METRICS}


def test_rpo_nll_term_matches_trl_sft_loss_type(trl_dpo, our_dpo):
    """RPO in TRL 1.16 is loss_type ["sigmoid", "sft"] with loss_weights [1, alpha]; its sft
    term is the mean NLL over all chosen completion tokens of the batch (a token mean, not a
    mean of per-pair means), which is what train_dpo adds as sft_weight * nll."""
    alpha = 0.3
    total, theirs, _ = trl_dpo(("sigmoid", "sft"), 0.5, (1.0, alpha))
    sft_only, _, _ = trl_dpo(("sft",), 0.5)
    ours = our_dpo(beta=0.5, loss_type="sigmoid", sft_weight=alpha)
    assert_close("sft nll", ours["sft_nll"], sft_only)
    assert_close("sigmoid + alpha * sft", ours["dpo_loss"] + alpha * ours["sft_nll"], total)
    for name in REWARD_METRICS:
        assert_close(f"rpo {name}", ours[name], theirs[name])


def test_trl_sigmoid_ignores_label_smoothing_which_ours_applies(trl_dpo, our_dpo):
    """What DpoConfig.label_smoothing's description says: TRL 1.16's sigmoid loss has no
    label-smoothing term, so TRL at 0.2 equals us at 0, and our cDPO loss at 0.2 is ours alone."""
    smoothed, _, _ = trl_dpo(("sigmoid",), 0.5, label_smoothing=0.2)
    assert_close("TRL sigmoid at label_smoothing 0.2 vs ours at 0", our_dpo(beta=0.5, loss_type="sigmoid")["dpo_loss"], smoothed)
    assert not close(our_dpo(beta=0.5, loss_type="sigmoid", label_smoothing=0.2)["dpo_loss"], smoothed)


def test_trl_tokenizes_pairs_like_us_plus_the_templates_newline(trl_dpo, dpo_batch):
    """TRL tokenizes the same conversations to the same prompt, and to our completion plus the
    newline the ChatML template writes after the end-of-turn token; the loss comparisons above
    feed TRL our ids, since that one extra token per side would move every sum."""
    _, _, trainer = trl_dpo(("sigmoid",), 0.5)
    newline = trainer.processing_class("\n", add_special_tokens=False)["input_ids"]
    for theirs, ours in zip(trainer.train_dataset, dpo_batch["examples"]):
        assert theirs["prompt_ids"] == ours["prompt_ids"]
        assert theirs["chosen_ids"] == ours["chosen_ids"] + newline
        assert theirs["rejected_ids"] == ours["rejected_ids"] + newline


# ---------------------------------------------------------------------------------------
# TRL 1.16 SFTTrainer, padding-free
# ---------------------------------------------------------------------------------------

# ChatML exactly as CHATML_TEMPLATE renders it, with generation markers around what our
# renderer weights (assistant content and its end-of-turn token), so that TRL's
# assistant_only_loss can select tokens itself
MARKED_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def sft_examples(policy_and_reference):
    """Multi-turn chats (some with a system turn), every assistant message weighted: several
    weighted spans per sequence and sequences of different lengths in one packed row."""
    policy, _ = policy_and_reference
    chats = arithmetic_chats(4, 3)
    tok = _tokenizer(policy)
    return chats, [render(tok, c, "all_assistant_messages", "chat_template") for c in chats]


def _trl_sft(trl, model_dir: Path, dataset, tmp_path, tokenizer=None, **config):
    """The whole dataset as one batch, so that TRL's padding-free path (one row, restarted
    position ids, no attention mask) is what computes the loss and its gradients."""
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl_sft"), padding_free=True, bf16=False, fp16=False,
                         activation_checkpointing=False, use_cpu=True, report_to=[], max_length=None, disable_tqdm=True,
                         save_strategy="no", **config)
    trainer = trl.SFTTrainer(model=_hf_model(model_dir), args=args, train_dataset=dataset,
                             processing_class=tokenizer or _tokenizer(model_dir))
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one packed row, no padding mask
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}, rows


@pytest.fixture(scope="module")
def trl_sft_on_our_ids(trl, quiet_transformers, policy_and_reference, sft_examples, tmp_path_factory):
    """TRL's side does not depend on our row layout: computed once for all three."""
    from datasets import Dataset

    policy, _ = policy_and_reference
    _, examples = sft_examples
    tokenized = Dataset.from_list([{"input_ids": t, "labels": [x if w else -100 for x, w in zip(t, ws)]} for t, ws in examples])
    loss, grads, _ = _trl_sft(trl, policy, tokenized, tmp_path_factory.mktemp("trl_sft"))
    return loss, grads


@pytest.mark.parametrize("layout", [{"pack_length": 100_000}, {}, {"packing": False}],
                         ids=["one_packed_row", "auto_packing", "unpacked"])
def test_sft_cross_entropy_matches_trl_padding_free(trl_sft_on_our_ids, policy_and_reference, sft_examples, layout):
    """TRL's padding-free row relies on restarted position ids to keep sequences apart
    (transformers derives the block-diagonal mask from them); ours on an explicit 4-D mask.
    Whatever our row layout, loss and gradients are TRL's: the mean NLL per weighted token."""
    policy, _ = policy_and_reference
    _, examples = sft_examples
    loss, grads = trl_sft_on_our_ids

    client = _backend(**layout).create_training_client(policy, 0, 0)
    total = sum(sum(w[1:]) for _, w in examples)
    fb = client.forward_backward([Datum.from_sequence(t, [x / total for x in w]) for t, w in examples], "cross_entropy")
    assert_close("sft mean nll (forward_backward)", fb.metrics["loss:sum"], loss)
    worst = max((p.grad - grads[n]).abs().max().item() for n, p in client.model.named_parameters())
    print(f"sft gradients: max |diff| {worst:.2e}")
    assert worst <= 1e-5  # gradient entries reach 0.3: absolute 1e-5 is the loss's bound


def test_train_sft_step_reports_trls_loss(trl_sft_on_our_ids, policy_and_reference, sft_examples, tmp_path):
    """train_sft's own normalization (weights over the batch's weighted target tokens, the
    first token never a target) makes its train_mean_nll TRL's per-token mean."""
    policy, _ = policy_and_reference
    _, examples = sft_examples
    client = _backend().create_training_client(policy, 0, 0)
    out, _ = train_sft(client, examples, examples[:1], TrainConfig(max_steps=1, batch_size=len(examples), eval_every=1,
                                                                    save_every=1), tmp_path, lambda _: None)
    assert_close("train_mean_nll (train_sft)", out[0]["train_mean_nll"], trl_sft_on_our_ids[0])


def test_trl_assistant_only_tokenization_equals_our_weights(trl, quiet_transformers, policy_and_reference, sft_examples,
                                                            tmp_path):
    """TRL tokenizes the conversations itself (apply_chat_template with the assistant mask,
    its padding-free collator) and lands on our ids and weights, so its loss is ours too."""
    from datasets import Dataset

    policy, _ = policy_and_reference
    chats, examples = sft_examples
    tok = _tokenizer(policy)
    for chat in chats:
        assert (tok.apply_chat_template(chat["messages"], tokenize=False, chat_template=MARKED_CHATML)
                == tok.apply_chat_template(chat["messages"], tokenize=False, chat_template=CHATML_TEMPLATE))
    tok.chat_template = MARKED_CHATML
    loss, _, rows = _trl_sft(trl, policy, Dataset.from_list(chats), tmp_path, tokenizer=tok, assistant_only_loss=True)
    for row, (tokens, weights) in zip(rows, examples):
        assert row["input_ids"] == tokens
        assert [label != -100 for label in row["labels"]] == [w > 0 for w in weights]
    client = _backend().create_training_client(policy, 0, 0)
    total = sum(sum(w[1:]) for _, w in examples)
    fb = client.forward_backward([Datum.from_sequence(t, [x / total for x in w]) for t, w in examples], "cross_entropy")
    assert_close("sft mean nll, TRL's own tokenization", fb.metrics["loss:sum"], loss)


# ---------------------------------------------------------------------------------------
# tinker-cookbook 0.6.1
# ---------------------------------------------------------------------------------------

EDGE_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "line one\nline two\n\nafter a blank line"},
                  {"role": "assistant", "content": "two\n\nparagraphs"}]},
    {"messages": [{"role": "user", "content": "Ünïcödé — 数字 🙂?"}, {"role": "assistant", "content": "ok 🙂"}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "  spaced  "},
                  {"role": "assistant", "content": " leading space"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "done."}]},
]


@pytest.fixture(scope="module")
def conversations():
    return arithmetic_conversations(4, 0) + arithmetic_chats(6, 0) + EDGE_CONVERSATIONS


def _cookbook_example(renderer, messages, mode: str) -> tuple[list[int], list[float]]:
    from tinker_cookbook.renderers import TrainOnWhat

    model_input, weights = renderer.build_supervised_example(messages, TrainOnWhat(mode))
    return model_input.to_ints(), [float(w) for w in weights.tolist()]


def _weight_differences(tok, tokens, ours, theirs) -> list[tuple[str, float]]:
    """(text, our weight) of each run of tokens weighted differently: runs name the
    differences in words, so the test can say which ones are expected."""
    runs, i = [], 0
    while i < len(tokens):
        if ours[i] == theirs[i]:
            i += 1
            continue
        j = i
        while j < len(tokens) and ours[j] != theirs[j] and ours[j] == ours[i]:
            j += 1
        runs.append((tok.decode(tokens[i:j]), ours[i]))
        i = j
    return runs


def test_role_colon_matches_tinker_cookbook(cookbook, tiny, conversations):
    """Our role_colon is tinker-cookbook's RoleColonRenderer: the same text, tokenized whole
    by us and piecewise (label, content, stop overlap) by it, to the same ids in every mode;
    the same generation prompt and stop sequence; the same weights when training on the last
    assistant message. Two deliberate differences, asserted so that either side's drift shows:
    - all_assistant_messages: an assistant turn that a user turn follows ends, for us, the
      way sampling stops it, with "\\n\\nUser:" weighted; the cookbook weights "User:" only
      after the last message (its stop_overlap) and leaves the next turn's label unweighted.
    - all_messages: the cookbook weights every message's trailing "\\n\\n"; we weight the
      "\\n\\nUser:" before a user turn and leave the "\\n\\n" before "Assistant:" unweighted."""
    from tinker_cookbook.renderers import get_renderer

    tok = _tokenizer(tiny)
    renderer = get_renderer("role_colon", tok)
    assert renderer.get_stop_sequences() == stop_sequences(tok, "role_colon")
    for record in conversations:
        messages = record["messages"]
        for mode in ("last_assistant_message", "all_assistant_messages", "all_messages"):
            tokens, theirs = _cookbook_example(renderer, messages, mode)
            ours_tokens, ours = render(tok, record, mode, "role_colon")
            assert ours_tokens == tokens, (mode, messages)
            runs = _weight_differences(tok, tokens, ours, theirs)
            if mode == "last_assistant_message":
                assert runs == [], (mode, messages)
            elif mode == "all_assistant_messages":
                closed_turns = sum(a["role"] == "assistant" and b["role"] == "user" for a, b in zip(messages, messages[1:]))
                assert runs == [("User:", 1.0)] * closed_turns, (mode, messages)
            else:
                assert {run for run in runs} <= {("User:", 1.0), ("\n\n", 0.0)} and runs, (mode, messages)
        prompt = renderer.build_generation_prompt(messages[:-1]).to_ints()
        assert prompt_and_reference(tok, record, "role_colon")[0] == prompt


def test_chat_template_matches_cookbook_qwen3_instruct(cookbook, tiny, conversations):
    """Our base tokenizer's template is ChatML, which the cookbook writes as its Qwen3-2507
    instruct renderer: the same ids and weights, except that our text is the whole template
    render, so it ends with the newline after the last end-of-turn token (weight 0), where the
    cookbook's supervised example stops at the token. Same generation prompts; its stop is the
    end-of-turn token by id, ours by string."""
    from tinker_cookbook.renderers import get_renderer

    tok = _tokenizer(tiny)
    renderer = get_renderer("qwen3_instruct", tok)
    assert [tok.convert_ids_to_tokens(t) for t in renderer.get_stop_sequences()] == stop_sequences(tok, "chat_template")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for record in conversations:
        for mode in ("last_assistant_message", "all_assistant_messages"):
            tokens, theirs = _cookbook_example(renderer, record["messages"], mode)
            ours_tokens, ours = render(tok, record, mode, "chat_template")
            assert ours_tokens == tokens + newline and ours == theirs + [0.0], (mode, record)
        prompt = renderer.build_generation_prompt(record["messages"][:-1]).to_ints()
        assert prompt_and_reference(tok, record, "chat_template")[0] == prompt


def test_supervised_datum_and_mean_nll_match_cookbook(cookbook, tiny, conversations):
    """The cookbook's supervised datum (right-shifted input, left-shifted targets and weights)
    is our Datum.from_sequence, and its batch mean NLL (sum of weighted NLL over the sum of
    weights) is what train_sft's normalized cross_entropy reports."""
    import tinker
    from tinker_cookbook.renderers import get_renderer
    from tinker_cookbook.supervised.common import compute_mean_nll, datum_from_model_input_weights

    renderer = get_renderer("role_colon", _tokenizer(tiny))
    theirs = [datum_from_model_input_weights(*renderer.build_supervised_example(r["messages"])) for r in conversations]
    examples = [render(_tokenizer(tiny), r, "last_assistant_message", "role_colon") for r in conversations]
    data = [Datum.from_sequence(t, w) for t, w in examples]
    for ours, datum in zip(data, theirs):
        assert ours.model_input == datum.model_input.to_ints()
        assert ours.loss_fn_inputs["target_tokens"] == datum.loss_fn_inputs["target_tokens"].tolist()
        assert ours.loss_fn_inputs["weights"] == datum.loss_fn_inputs["weights"].tolist()
    client = _backend().create_training_client(tiny, 0, 0)
    total = sum(sum(d.loss_fn_inputs["weights"]) for d in data)
    fb = client.forward_backward([Datum.from_sequence(t, [x / total for x in w]) for t, w in examples], "cross_entropy")
    logprobs = [tinker.TensorData.from_torch(out["logprobs"]) for out in fb.loss_fn_outputs]
    assert_close("mean nll vs cookbook compute_mean_nll", fb.metrics["loss:sum"],
                 float(compute_mean_nll(logprobs, [d.loss_fn_inputs["weights"] for d in theirs])))


@pytest.fixture(scope="module")
def rollouts(tiny):
    """Two groups of four answers really sampled from the tiny model (so the sampler's
    log-probs are real), with hand-set rewards that no grader would give a random model."""
    client = _backend().create_training_client(tiny, 0, 0)
    tok = client.tokenizer
    prompts = [tok(f"User: What is {q}?\n\nAssistant:")["input_ids"] for q in ("2 + 3", "7 - 4")]
    groups = client.sample(prompts, 4, SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    rewards = [np.array([1.0, 0.0, 0.5, -0.1]), np.array([0.2, 0.2, 0.9, 0.0])]
    zeros = np.zeros(4)
    return [GroupRollout(p, g, zeros, zeros, r) for p, g, r in zip(prompts, groups, rewards)]


def _cookbook_groups(rollouts):
    """Our rollouts as the cookbook's single-transition trajectory groups, the reward given as
    the group's final reward (the total is their sum either way)."""
    import tinker
    from tinker_cookbook.completers import TokensWithLogprobs
    from tinker_cookbook.rl.types import Trajectory, TrajectoryGroup, Transition

    groups = []
    for g in rollouts:
        trajectories = [Trajectory(transitions=[Transition(ob=tinker.ModelInput.from_ints(list(g.prompt)),
                                                           ac=TokensWithLogprobs(tokens=s.tokens, maybe_logprobs=s.logprobs),
                                                           reward=0.0, episode_done=True)],
                                   final_ob=tinker.ModelInput.empty()) for s in g.samples_G]
        groups.append(TrajectoryGroup(trajectories_G=trajectories, final_rewards_G=list(g.rewards_G),
                                      metrics_G=[{} for _ in trajectories]))
    return groups


def _datum_arrays(datum) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=float) for k, v in datum.loss_fn_inputs.items()}


def test_group_advantages_and_datums_match_cookbook(cookbook, rollouts):
    """The cookbook centres rewards within each group and gives every sampled token its
    trajectory's advantage, with prompt tokens masked; so do we (advantage_std_normalize,
    off by default, has no cookbook counterpart). Datums agree field by field: its `mask` is
    our `weights`."""
    from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages

    groups = _cookbook_groups(rollouts)
    for theirs, g in zip(compute_advantages(groups), rollouts):
        assert np.abs(theirs.numpy() - group_advantages(g.rewards_G, std_normalize=False)).max() <= 1e-6
    data, _ = assemble_training_data(groups, compute_advantages(groups))
    ours = token_advantages(rollouts, RlConfig(), None)
    assert len(data) == len(ours)
    worst = 0.0
    for datum, (prompt, sample, adv_T) in zip(data, ours):
        mine, theirs = rl_datum(list(prompt), sample, adv_T, 1.0), _datum_arrays(datum)
        assert mine.model_input == datum.model_input.to_ints()
        assert mine.loss_fn_inputs["target_tokens"] == theirs["target_tokens"].astype(int).tolist()
        assert mine.loss_fn_inputs["weights"] == theirs["mask"].tolist()
        assert np.abs(np.array(mine.loss_fn_inputs["logprobs"]) - theirs["logprobs"]).max() <= 1e-6
        worst = max(worst, np.abs(np.array(mine.loss_fn_inputs["advantages"]) - theirs["advantages"]).max())
    print(f"rl advantages per token: max |diff| {worst:.2e}")
    assert worst <= 1e-5


class _ReferenceSampler:
    """The cookbook scores sequences for its KL penalty through a Tinker sampling client's
    prompt log-probs; this one answers with our reference client's log-probs."""

    def __init__(self, client):
        self.client = client

    def sample(self, prompt, num_samples, sampling_params, include_prompt_logprobs=False):
        class Response:
            prompt_logprobs = [None] + self.client.compute_logprobs([prompt.to_ints()])[0]
            prompt_cache_hit_tokens = 0
            sequences = []

        class Future:
            async def coroutine(_):
                return Response()

        return Future()


def test_kl_penalty_is_the_cookbooks_less_its_batch_mean(cookbook, tiny, tmp_path, rollouts):
    """A difference, asserted: both subtract kl_penalty_coef * (log p_sampler - log p_ref) per
    sampled token, but the cookbook adds back kl_penalty_coef times that difference's mean
    over the batch's sampled tokens (its `kl_policy_base`), centring the penalty; we do not.
    In expectation the constant shifts no gradient of an on-policy loss, but it moves every
    advantage by the same amount (here ~0.016)."""
    from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages
    from tinker_cookbook.rl.metrics import incorporate_kl_penalty

    from crucible_assets.base import build_tiny_llama

    build_tiny_llama(tiny, tmp_path / "reference", 64, 2, 4, 128, 256, 1)
    reference = _backend().create_training_client(tmp_path / "reference", 0, 0)
    coef = 0.3
    groups = _cookbook_groups(rollouts)
    data, _ = assemble_training_data(groups, compute_advantages(groups))
    metrics, _ = asyncio.run(incorporate_kl_penalty(data, _ReferenceSampler(reference), coef, 0.0))
    ours = token_advantages(rollouts, RlConfig(kl_penalty_coef=coef, kl_reference="base_model"), reference)
    shift = coef * metrics["kl_policy_base"]
    assert abs(shift) > 1e-3
    for datum, (prompt, sample, adv_T) in zip(data, ours):
        mine, theirs = rl_datum(list(prompt), sample, adv_T, 1.0), _datum_arrays(datum)
        sampled = np.array(mine.loss_fn_inputs["weights"]) > 0
        gap = theirs["advantages"] - np.array(mine.loss_fn_inputs["advantages"])
        assert np.abs(gap[sampled] - shift).max() <= 1e-5 and np.abs(gap[~sampled]).max() == 0


def test_dpo_loss_matches_cookbook(cookbook, dpo_batch):
    """The cookbook's DPO loss is TRL's sigmoid loss under its own metric names (accuracy,
    margin, chosen_reward, rejected_reward); on our batch's summed completion log-probs it
    equals our dpo_loss and reward metrics. It has no IPO, hinge or label smoothing."""
    from tinker_cookbook.preference.train_dpo import compute_dpo_loss

    policy_logps, ref = dpo_batch["policy"], dpo_batch["ref"]
    as_fp32 = lambda a: [torch.tensor(x, dtype=torch.float32) for x in a]  # noqa: E731  the cookbook's dtype
    beta = 0.5
    loss, theirs = compute_dpo_loss(as_fp32(policy_logps["chosen_logps"]), as_fp32(policy_logps["rejected_logps"]),
                                    as_fp32(ref["chosen_logps"]), as_fp32(ref["rejected_logps"]), beta)
    t = {k: torch.tensor(v) for k, v in {**policy_logps, **{f"ref_{k}": v for k, v in ref.items()}}.items()}
    ours = reward_metrics(*dpo_loss(t["chosen_logps"], t["rejected_logps"], t["ref_chosen_logps"], t["ref_rejected_logps"],
                                    beta, "sigmoid"), t["chosen_logps"], t["rejected_logps"])
    for mine, their in (("dpo_loss", "dpo_loss"), ("rewards/accuracies", "accuracy"), ("rewards/margins", "margin"),
                        ("rewards/chosen", "chosen_reward"), ("rewards/rejected", "rejected_reward")):
        assert_close(f"cookbook {their}", ours[mine], theirs[their])
    assert 0 < theirs["accuracy"] < 1
