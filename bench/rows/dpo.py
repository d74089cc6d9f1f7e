"""DPO: ours (the frozen reference's completion log-probs computed once, then train_dpo's
steps) against TRL's DPOTrainer with an explicit ref_model; its expert line precomputes the
reference log-probs too (`precompute_ref_log_probs`), its defaults score the reference every
step. Rate: preference pairs per second, reference log-probs included on both sides."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.result import Row
from bench.rows.common import hf_model, our_client, our_train_config, spelled, trl_args, train_quietly, trl_expert
from bench.timing import interleaved, medians, op_profile, timed
from bench.workload import MAX_LENGTH
from crucible_assets.train.dpo import DpoConfig, completion_logps, train_dpo


def trl_pairs(records: list[dict]) -> list[dict]:
    """TRL's explicit-prompt conversational format: shared turns, then each last answer."""
    return [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in records]


def run(w, plan) -> list[Row]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    n = plan.dpo_steps * plan.batch_size
    rows = w.pair_rows[:n]
    pairs = Dataset.from_list(trl_pairs(w.pairs[:n]))

    def ours(measure=timed) -> float:
        policy, reference = our_client(w.model_dir), our_client(w.model_dir)
        cfg = our_train_config(DpoConfig, plan, plan.dpo_steps)

        def work():
            ref = completion_logps(reference, rows)
            test = {k: v[:2] for k, v in ref.items()}
            train_dpo(policy, rows, ref, rows[:2], test, cfg, Path(tempfile.mkdtemp()), log=lambda _: None)

        return n / measure(work)

    def trl(**fields):
        def rep() -> float:
            args = trl_args(DPOConfig, plan, plan.dpo_steps, per_device_train_batch_size=plan.batch_size,
                            max_length=MAX_LENGTH, **fields)
            trainer = DPOTrainer(model=hf_model(w.model_dir), ref_model=hf_model(w.model_dir), args=args,
                                 train_dataset=pairs, processing_class=w.tokenizer)
            return n / timed(lambda: train_quietly(trainer))
        return rep

    expert = trl_expert(precompute_ref_log_probs=True)
    m = medians(interleaved({"ours": ours, "trl": trl(**expert), "trl_defaults": trl()}, plan.reps))
    details = {"ours pairs/s": m["ours"], "TRL (expert) pairs/s": m["trl"], "TRL expert config": spelled(expert),
               "TRL (defaults) pairs/s": m["trl_defaults"], "ratio vs TRL defaults": m["ours"] / m["trl_defaults"],
               "steps": plan.dpo_steps, "pairs per step": plan.batch_size}
    return [Row("DPO", "pairs/s incl. reference log-probs, ours / TRL DPOTrainer (expert)", m["ours"] / m["trl"], 2.0,
                details=details, profile=op_profile(ours), limit="both sides score the reference once and run the policy on chosen and rejected in "
                "one forward, the same bf16 work per step (see the profile); leading it needs less work: the prompt "
                "both sides share computed once (a prefix-shared forward), not built")]
