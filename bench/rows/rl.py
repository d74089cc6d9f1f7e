"""RL: our math_rl loop (sample a group per problem, grade, centered advantages,
importance-sampling step) against TRL's GRPOTrainer with the same group size, completions
per step, token budget, lr and our arithmetic grader as its reward function. Rate:
completions per second, sampling plus training."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.result import Row
from bench.rows.common import hf_model, our_client, our_train_config, spelled, trl_args, train_quietly, trl_expert
from bench.timing import interleaved, medians, op_profile, timed
from resources.datasets.graders import grade
from crucible_assets.train.rl import RlConfig, train_rl

FORMAT_COEF = RlConfig().format_coef


def arithmetic_reward(completions, reference, **_) -> list[float]:
    """Our reward (correct + format_coef * (formatted - 1)) in TRL's reward-function shape."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    graded = [grade("arithmetic", t, r) for t, r in zip(texts, reference)]
    return [float(correct) + FORMAT_COEF * (float(formatted) - 1) for correct, formatted in graded]


def run(w, plan) -> list[Row]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    problems_per_step = max(plan.batch_size // plan.group_size, 1)
    completions = plan.rl_steps * problems_per_step * plan.group_size
    rows = w.problem_rows[: plan.rl_steps * problems_per_step]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}], "reference": p["answer"]}
                                 for p in w.problems[: len(rows)]])

    def ours(measure=timed) -> float:
        client = our_client(w.model_dir)
        cfg = our_train_config(RlConfig, plan, plan.rl_steps, group_size=plan.group_size, max_tokens=plan.rl_max_tokens,
                               eval_problems=1)
        cfg = cfg.model_copy(update={"batch_size": problems_per_step})
        return completions / measure(lambda: train_rl(client, None, rows, rows[:1], cfg, w.stop,
                                                    Path(tempfile.mkdtemp()), log=lambda _: None))

    def trl(**fields):
        def rep() -> float:
            args = trl_args(GRPOConfig, plan, plan.rl_steps, per_device_train_batch_size=problems_per_step * plan.group_size,
                            num_generations=plan.group_size, max_completion_length=plan.rl_max_tokens, **fields)
            trainer = GRPOTrainer(model=hf_model(w.model_dir), reward_funcs=arithmetic_reward, args=args,
                                  train_dataset=prompts, processing_class=w.tokenizer)
            return completions / timed(lambda: train_quietly(trainer))
        return rep

    expert = trl_expert()
    m = medians(interleaved({"ours": ours, "trl": trl(**expert), "trl_defaults": trl()}, plan.reps))
    details = {"ours completions/s": m["ours"], "TRL (expert) completions/s": m["trl"], "TRL expert config": spelled(expert),
               "TRL (defaults) completions/s": m["trl_defaults"], "ratio vs TRL defaults": m["ours"] / m["trl_defaults"],
               "steps": plan.rl_steps, "group size": plan.group_size, "completions per step": problems_per_step * plan.group_size,
               "max tokens": plan.rl_max_tokens}
    return [Row("RL", "completions/s (sampling + training), ours / TRL GRPOTrainer (expert)", m["ours"] / m["trl"], 2.0,
                details=details, profile=op_profile(ours), limit="sampling dominates at this size: ours decodes each step's prompts in one batch "
                "with its own loop (the prompt's KV cache shared by its samples), TRL with one generate call; the "
                "training half is the same forward and backward on both sides")]
