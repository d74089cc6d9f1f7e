"""Sampling: our backend's `sample` (its own decode loop: one prefill per prompt, the KV cache
shared by the prompt's samples, one forward per token) against one batched `model.generate`
over the same prompts (left-padded), samples per prompt, temperature, token budget and
precision. Rate: generated tokens per second."""

from __future__ import annotations

import torch

from bench.result import Row
from bench.rows.common import hf_model, our_client
from bench.timing import interleaved, medians, op_profile, timed
from resources.backends.types import SamplingParams


def run(w, plan) -> list[Row]:
    prompts = [list(r["prompt_tokens"]) for r in w.problem_rows[: plan.sample_prompts]]
    params = SamplingParams(max_tokens=plan.sample_max_tokens, temperature=1.0, stop=w.stop, seed=0)
    client, model = our_client(w.model_dir), hf_model(w.model_dir).eval()
    bf16 = client.bf16  # the reference samples at the precision the probe chose for ours
    eos = model.generation_config.eos_token_id

    def ours(measure=timed) -> float:
        out = []
        seconds = measure(lambda: out.extend(client.sample(prompts, plan.group_size, params)))
        return sum(len(s.tokens) for group in out for s in group) / seconds

    def batched() -> float:
        """The strongest plain-transformers way: every prompt in one left-padded generate call."""
        width = max(map(len, prompts))
        pad = w.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        generated = 0

        def work():
            nonlocal generated
            torch.manual_seed(0)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None,
                                      max_new_tokens=plan.sample_max_tokens, num_return_sequences=plan.group_size,
                                      eos_token_id=eos, pad_token_id=pad)
            generated = int((seqs[:, width:] != pad).sum())
        seconds = timed(work)
        return generated / seconds

    m = medians(interleaved({"ours": ours, "batched": batched}, plan.reps))
    details = {"ours tokens/s": m["ours"], "batched generate tokens/s": m["batched"], "precision": "bf16" if bf16 else "fp32",
               "prompts": len(prompts),
               "samples per prompt": plan.group_size, "max tokens": plan.sample_max_tokens}
    return [Row("Sampling", "generated tokens/s, ours / one batched model.generate", m["ours"] / m["batched"], 2.0,
                details=details, profile=op_profile(ours), limit="both sides decode every prompt in one batch with a KV cache, one forward per "
                "token; what is left is that forward's own cost (a static cache or a compiled step would cut its overhead)")]
