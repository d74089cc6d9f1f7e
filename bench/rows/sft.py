"""SFT: our supervised loop (forward_backward cross_entropy + optim_step on packed batches)
against TRL's SFTTrainer on the same chats, batch, max_length, steps and lr, padding-free
(each batch flattened into one row, as our packing does). Rate: real (non-padding) tokens
per second; both sides train the same examples once."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.result import Row
from bench.rows.common import hf_model, our_client, our_train_config, spelled, trl_args, train_quietly, trl_expert
from bench.timing import interleaved, medians, op_profile, timed
from bench.workload import MAX_LENGTH
from crucible_assets.train.sft import train_sft
from crucible_assets.train.loop import TrainConfig


def run(w, plan) -> list[Row]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    n = plan.sft_steps * plan.batch_size
    examples = [(r["tokens"], r["weights"]) for r in w.sft_rows[:n]]
    real_tokens = sum(len(t) for t, _ in examples)
    chats = Dataset.from_list(w.chats[:n])

    def ours(measure=timed) -> float:
        client = our_client(w.model_dir)
        cfg = our_train_config(TrainConfig, plan, plan.sft_steps)
        seconds = measure(lambda: train_sft(client, examples, examples[:2], cfg, Path(tempfile.mkdtemp()), log=lambda _: None))
        ours.last_seconds = seconds
        return real_tokens / seconds

    def trl(**fields):
        def rep() -> float:
            args = trl_args(SFTConfig, plan, plan.sft_steps, per_device_train_batch_size=plan.batch_size,
                            **{"max_length": MAX_LENGTH, **fields})
            trainer = SFTTrainer(model=hf_model(w.model_dir), args=args, train_dataset=chats, processing_class=w.tokenizer)
            return real_tokens / timed(lambda: train_quietly(trainer))
        return rep

    # padding-free without packing does not truncate: every chat here is shorter than MAX_LENGTH
    assert max(len(t) for t, _ in examples) <= MAX_LENGTH
    expert = trl_expert(padding_free=True, max_length=None)
    m = medians(interleaved({"ours": ours, "trl": trl(**expert), "trl_defaults": trl()}, plan.reps))
    details = {"ours tokens/s": m["ours"], "TRL (expert) tokens/s": m["trl"], "TRL expert config": spelled(expert),
               "TRL (defaults) tokens/s": m["trl_defaults"], "ratio vs TRL defaults": m["ours"] / m["trl_defaults"],
               "steps": plan.sft_steps, "batch": plan.batch_size, "real tokens per rep": real_tokens}
    return [Row("SFT", "real tokens/s, ours / TRL SFTTrainer (expert)", m["ours"] / m["trl"], 1.5, details=details,
                profile=op_profile(ours), limit="both sides run the same padding-free bf16 forward and backward on the same tokens, and after the "
                      "first steps they take about the same time per step: small matmuls far below the peak, the masked "
                      "attention's backward, autocast's weight casts (copy_) and AdamW (see the profile); TRL's lead in "
                      "fixed cost is its trainer set-up, which fewer steps would count")]
