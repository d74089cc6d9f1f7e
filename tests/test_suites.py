"""Eval suites (crucible_assets/suites/): every perturbation keeps the answer (a solver reads
the perturbed question and the recipe's grader accepts the reference for its result); maj@k
is the hand-counted vote; integrated gradients satisfy completeness on a tiny model; an
ensemble of a model with itself answers as that model; and a recipe's job materializes its
suites, whose tables reach the UI metadata and the registered model's card."""

import random
import re

import numpy as np
import pytest
import torch

from crucible_assets.suites import robustness
from crucible_assets.suites.attribution import integrated_gradients
from crucible_assets.suites.prompts import Prompt, answers, as_prompt
from crucible_assets.suites.self_consistency import logprob_mean_greedy, majority_vote
from resources.backends.local.backend import LocalTorchBackend
from resources.datasets.graders import grade_conversation
from resources.datasets.synthetic import arithmetic_chats, arithmetic_conversations, arithmetic_problems

WORDS = {w: i for i, w in enumerate(robustness.ONES)} | {w: 10 * i for i, w in enumerate(robustness.TENS) if w != "_"}


def words_to_number(text: str) -> str:
    """Inverse of number_words for 0..99 ("forty-seven" -> "47"), so a solver can read the question."""
    def one(m):
        return str(sum(WORDS[p] for p in m.group().lower().split("-")))
    return re.sub(r"\b(?:" + "|".join(sorted(WORDS, key=len, reverse=True)) + r")(?:-(?:" + "|".join(robustness.ONES) + r"))?\b",
                  one, text, flags=re.I)


def solve(messages: list[dict]) -> int:
    """Reads the arithmetic a conversation asks, whatever the wording: the first turn's
    `a + b` or `a - b`, then every `add d`."""
    total = None
    for m in messages:
        if m["role"] != "user":
            continue
        text = words_to_number(re.sub(r"\s+", " ", m["content"]))
        if total is None:
            a, op, b = re.search(r"(-?\d+) ([+-]) (-?\d+)", text).groups()
            total = int(a) + int(b) if op == "+" else int(a) - int(b)
        else:
            total += int(re.search(r"add (\d+)", text, flags=re.I).group(1))
    return total


@pytest.mark.parametrize("name", list(robustness.PERTURBATIONS))
def test_every_perturbation_keeps_the_answer(name):
    records = arithmetic_conversations(60, 1) + arithmetic_chats(60, 2) + \
        [{"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]}
         for p in arithmetic_problems(40, 3)]
    prompts = [as_prompt(r) for r in records]
    perturbed = robustness.perturb(prompts, name, seed=0)
    changed = 0
    for before, after in zip(prompts, perturbed):
        assert after.reference == before.reference and after.messages[-1]["role"] == "user"
        assert grade_conversation(after.reference, str(solve(after.messages)))[0], (name, after.messages)
        changed += after.messages != before.messages
    assert changed >= len(prompts) * 0.8  # it does perturb
    assert robustness.perturb(prompts, name, seed=0) == perturbed  # seeded: the same rewrite every run


def test_number_words():
    assert [robustness.number_words(n) for n in (0, 7, 13, 40, 47, 105, 2019, -3)] == [
        "zero", "seven", "thirteen", "forty", "forty-seven", "one hundred five", "two thousand nineteen", "minus three"]


@pytest.mark.parametrize("completions, winner", [
    (["= 5", "= 7", "= 5", "= 7", "= 9"], 0),            # 5 and 7 tie at two: the answer seen first wins
    (["= 7", "x 5", "y 5", "= 7", "5"], 1),              # 5 three times
    (["= 3", "no number", "no number"], 1),              # text-only answers are counted as their text
    (["", "", "12"], 2),                                 # an empty answer never wins
    (["\\boxed{1/2}", "0.5 \\boxed{1/2}", "2"], 0),     # boxed answers count by their box
])
def test_majority_vote_is_the_hand_counted_one(completions, winner):
    assert majority_vote(completions) == winner


@pytest.fixture
def client(tiny):
    torch.set_num_threads(1)
    return LocalTorchBackend(device="cpu", precision="fp32").create_training_client(tiny, 0, 0)


def test_integrated_gradients_are_complete_on_a_tiny_model(client):
    tok = client.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 13?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    answer = tok("12 + 13 = 25", add_special_tokens=False)["input_ids"]
    for steps, tolerance in ((16, 0.01), (64, 0.002)):
        ig, f_x, f_base = integrated_gradients(client.model, prompt, answer, steps, tok.eos_token_id)
        assert len(ig) == len(prompt) and abs(f_x - f_base) > 0.05  # the prompt matters to this answer
        assert abs(ig.sum() - (f_x - f_base)) <= tolerance * abs(f_x - f_base), (steps, ig.sum(), f_x - f_base)
    # the baseline is no arbitrary point: moving it changes the attributions
    other, _, f_other = integrated_gradients(client.model, prompt, answer, 64, tok.bos_token_id or 5)
    assert f_other != f_base and not np.allclose(other, ig)
    with pytest.raises(ValueError, match="almost"):  # the pad token's row is zero: no baseline
        integrated_gradients(client.model, prompt, answer, 8, tok.pad_token_id)


def test_an_ensemble_of_a_model_with_itself_is_that_model(client):
    tok = client.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for a, b in ((1, 2), (12, 7), (5, 19))]
    pad = tok.pad_token_id
    alone = logprob_mean_greedy([client.model.eval()], prompts, 10, pad, [tok.eos_token_id])
    assert logprob_mean_greedy([client.model, client.model], prompts, 10, pad, [tok.eos_token_id]) == alone
    greedy = [g[0] for g in answers(client, prompts, 1, 10, 0.0, [], 0)]
    assert [tok.decode(t, skip_special_tokens=True) for t in alone] == greedy  # the log-prob ensemble decodes as the sampler
    assert [greedy[i] for i in range(3)] == [[g, g][majority_vote([g, g])] for g in greedy]  # and a vote of two copies


def test_a_prompt_is_the_conversation_up_to_its_last_answer():
    chat = arithmetic_chats(1, 0)[0]
    assert as_prompt(chat) == Prompt(chat["messages"][:-1], chat["messages"][-1]["content"])
    assert as_prompt({"question": "What is 1 + 1?", "answer": 2}).reference == "2"
    assert as_prompt({"text": "plain text"}) is None
    pair = {"chosen": chat["messages"], "rejected": chat["messages"][:-1] + [{"role": "assistant", "content": "wrong"}]}
    assert as_prompt(pair).reference == chat["messages"][-1]["content"]


def test_a_recipe_job_builds_its_suites_into_the_ui_and_the_model_card_and_ensembles_registered_models(homes):
    """A tiny sl_basic run: each suite's table is UI metadata and a section of the model card;
    then its self-consistency suite alone, ensembling the registered model with itself, equals
    that model (the ensemble's gain over its best member is exactly zero)."""
    import copy
    import json

    from dagster import DagsterInstance

    from conftest import TINY_RUN_CONFIG, run_job
    from resources.store.artifact_store import ArtifactStore

    result = run_job("sl_basic", TINY_RUN_CONFIG)
    assert result.success
    store = ArtifactStore()
    card = (store.latest("sl_basic/registered_model").dir / "README.md").read_text()
    for heading in ("## Robustness", "## Self-consistency", "## Attribution"):
        assert heading in card
    with DagsterInstance.get() as instance:
        for suite in ("robustness", "self_consistency"):
            event = instance.get_latest_materialization_event(key_of(f"sl_basic/eval_{suite}"))
            table = event.asset_materialization.metadata["eval_table"]
            assert any(r.data["metric"].startswith(f"{suite}/") for r in table.records)
        heatmap = instance.get_latest_materialization_event(key_of("sl_basic/eval_attribution")).asset_materialization.metadata
        assert heatmap["attribution"].value.startswith("![attribution.png](data:image/png;base64,")

    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["sl_basic__eval_self_consistency"]["config"] |= {"members": ["sl_basic:1"], "combine": "logprob_mean"}
    assert run_job("sl_basic", config, assets=["sl_basic/eval_self_consistency"]).success
    report = json.loads((store.latest("sl_basic/eval_self_consistency").dir / "report.json").read_text())
    assert report["ensemble/members"] == {"sl_basic:1": report["ensemble/accuracy_vs_best_member"]}
    assert report["ensemble/accuracy_vs_best_member"] == report["start/ensemble/accuracy_vs_best_member"]
    assert report["ensemble/accuracy_vs_best_member_delta_ci"] == [0.0, 0.0]


@pytest.mark.parametrize("members, combine, problem", [
    (["math_rl@champion", "distillation@champion"], "vote", "a vote of 2 members"),
    (["math_rl:1", "math_rl:1", "x:2"], "vote", "name one model twice"),
    (["sl_basic@champion"], "logprob_mean", "follow an alias of sl_basic itself"),
])
def test_an_ensemble_that_cannot_report_fairly_is_refused(members, combine, problem):
    from crucible_assets.suites.assets import check_members
    from crucible_assets.suites.self_consistency import SelfConsistencyConfig

    with pytest.raises(ValueError, match=problem):
        check_members("sl_basic", SelfConsistencyConfig(members=members, combine=combine))
    assert check_members("sl_basic", SelfConsistencyConfig(members=["sl_basic:1", "math_rl@champion"], combine="logprob_mean"))


def key_of(name: str):
    from dagster import AssetKey

    return AssetKey.from_user_string(name)


@pytest.mark.parametrize("first, second, score", [("A", "B", 1.0), ("B", "A", 0.0), ("tie", "tie", 0.5), ("A", "A", 0.5),
                                                  (None, "A", 0.25), ("B", None, 0.25)])
def test_a_trained_answers_score_is_averaged_over_both_orders(first, second, score):
    from crucible_assets.suites.judge import trained_score

    assert trained_score(first, second) == score


@pytest.mark.parametrize("reply, parsed", [("A", "A"), (" b.", "B"), ("Tie", "tie"), ("**A** is better", "A"),
                                           ("Answer A", None), ("", None), ("Both are fine", None)])
def test_the_judges_verdict_is_its_first_word(reply, parsed):
    from crucible_assets.suites.judge import verdict

    assert verdict(reply) == parsed


def test_judge_eval_runs_against_a_stand_in_and_a_rerun_makes_no_call(homes, tmp_path):
    """A judge that always says "A" has only position bias: both orders cancel it to a win rate
    of exactly 0.5, and no verdict pair agrees. A second build of the asset (another bootstrap
    setting) asks nothing again: every call is a cache hit."""
    import copy
    import json

    from api_standins import BASE_URLS, KEY, StandIn, serve
    from conftest import TINY_RUN_CONFIG, execute_job, run_job
    from resources.store.artifact_store import ArtifactStore

    assert run_job("sl_basic", TINY_RUN_CONFIG).success
    stand_in = StandIn()
    stand_in.answer = lambda provider, messages: "A"
    base, stop = serve(stand_in)
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["resources"] = {**config["resources"], "models": {"config": {
        "provider": "anthropic", "model": "judge-1", "base_url": BASE_URLS["anthropic"].format(base=base), "key_variable": "JUDGE_KEY"}}}
    config["ops"]["sl_basic__judge_eval"] = {"config": {"enabled": True, "num_prompts": 8, "max_tokens": 8}}
    try:  # from the CLI, the whole job: everything but judge_eval is a cache hit of the run above
        execute_job("sl_basic", config, homes, tmp_path, JUDGE_KEY=KEY)
        assert stand_in.calls["anthropic"] == 16
        config["ops"]["sl_basic__judge_eval"]["config"]["bootstrap_samples"] = 200
        execute_job("sl_basic", config, homes, tmp_path, JUDGE_KEY=KEY)
        assert stand_in.calls["anthropic"] == 16
    finally:
        stop()
    report = json.loads((ArtifactStore().latest("sl_basic/judge_eval").dir / "report.json").read_text())
    assert report["judge/win_rate"] == report["start/judge/win_rate"] == 0.5 and report["judge/position_consistent"] == 0.0
    assert report["judge/usage"]["cache_hits"] == 16 and report["judge/usage"]["calls"] == 0
    cached = [p for p in (ArtifactStore().base / "api_calls").rglob("*.json")]
    assert len(cached) == 16 and all('"judge-1"' in p.read_text() for p in cached)
    written = [p for home in homes for p in home.rglob("*") if p.is_file()]  # the store, the registry, Dagster's event log
    assert any(p.suffix == ".db" for p in written) and not [p for p in written if KEY.encode() in p.read_bytes()]


def test_a_judge_without_its_key_fails_before_any_asset_runs(homes, monkeypatch):
    import copy

    from conftest import TINY_RUN_CONFIG, run_job
    from resources.store.artifact_store import ArtifactStore

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["resources"] = {**config["resources"], "models": {"config": {"provider": "anthropic", "model": "judge-1"}}}
    config["ops"]["sl_basic__judge_eval"] = {"config": {"enabled": True}}
    result = run_job("sl_basic", config, raise_on_error=False)
    assert not result.success
    kinds = [e.event_type_value for e in result.all_events]
    assert "RESOURCE_INIT_FAILURE" in kinds and "STEP_START" not in kinds  # resources start with the run, before any step
    (failure,) = [e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"]
    assert "ANTHROPIC_API_KEY, which is not set" in str(failure.event_specific_data.error)
    assert not (ArtifactStore().base / "objects").exists()
