"""Sampling: our backend's `sample` (all prompts in one batched, KV-cached generate) against
plain `model.generate` called prompt by prompt, with the same prompts, samples per prompt,
temperature and token budget. Rate: generated tokens per second."""

from __future__ import annotations

import torch

from bench.result import Row
from bench.rows.common import hf_model, our_client
from bench.timing import interleaved, medians, timed
from resources.backends.types import SamplingParams


def run(w, plan) -> list[Row]:
    prompts = [list(r["prompt_tokens"]) for r in w.problem_rows[: plan.sample_prompts]]
    params = SamplingParams(max_tokens=plan.sample_max_tokens, temperature=1.0, stop=w.stop, seed=0)
    client, model = our_client(w.model_dir), hf_model(w.model_dir).eval()
    eos = model.generation_config.eos_token_id

    def ours() -> float:
        out = []
        seconds = timed(lambda: out.extend(client.sample(prompts, plan.group_size, params)))
        return sum(len(s.tokens) for group in out for s in group) / seconds

    def plain() -> float:
        generated = 0

        def work():
            nonlocal generated
            torch.manual_seed(0)
            with torch.no_grad():
                for p in prompts:
                    ids = torch.tensor([p])
                    seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                          top_k=None, max_new_tokens=plan.sample_max_tokens,
                                          num_return_sequences=plan.group_size, eos_token_id=eos, pad_token_id=w.tokenizer.pad_token_id)
                    generated += int((seqs[:, len(p):] != w.tokenizer.pad_token_id).sum())

        seconds = timed(work)
        return generated / seconds

    m = medians(interleaved({"ours": ours, "plain": plain}, plan.reps))
    details = {"ours tokens/s": m["ours"], "plain generate tokens/s": m["plain"], "prompts": len(prompts),
               "samples per prompt": plan.group_size, "max tokens": plan.sample_max_tokens}
    return [Row("Sampling", "generated tokens/s, ours / plain model.generate per prompt", m["ours"] / m["plain"], 1.5,
                details=details, limit="both sides run transformers' generate with a KV cache; ours batches every prompt "
                "into one call and also returns per-token log-probs")]
