"""One decode step of a Llama-family model without transformers' per-token machinery.

Profiled on the bench's 10M Llama (64 rows, bf16 autocast, 2 CPU threads), a generate-style
step spent a quarter of its time growing the KV cache by concatenation (every layer, every
token: quadratic copying), an eighth re-casting fp32 weights to bf16 under autocast, and much
of the rest in small per-module calls. Here the KV cache is preallocated for the whole
answer and written in place, the weights are cast once per sampling call and fused (q, k, v
in one matmul; gate and up in another), and a step is one straight pass over the layers.

The prefill stays transformers' forward (its masks handle any prompt layout); its cache is
copied into the preallocated one. The rotary embedding and activation are the model's own
modules and the norms compute what the family's RMSNorm does, so numerics follow the model's code. Only architectures whose decoder layer is
exactly Llama's (pre-norm attention + gated MLP, optional q/k bias and q/k norms) qualify;
anything else (other families, LoRA-wrapped models, sliding-window attention) keeps the
generic step. Shapes: N rows, T cache capacity, H query heads, K key/value heads, D head size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


@dataclass
class _Layer:
    module: torch.nn.Module  # the decoder layer: its norms and activation are used as they are
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    keys_N_K_T_D: torch.Tensor
    values_N_K_T_D: torch.Tensor


def supports(model, capacity: int) -> bool:
    """Whether `model` runs the lean step for a cache of `capacity` positions."""
    if type(model).__name__ not in SUPPORTED:
        return False
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    window = getattr(config, "sliding_window", None)
    return window is None or window >= capacity


class LeanStep:
    """Built after the prefill from its filled DynamicCache (N rows, P positions); each call
    feeds one token per row and returns the next-token logits."""

    def __init__(self, model, cache, mask_N_P: torch.Tensor, capacity: int) -> None:
        device_type = mask_N_P.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else model.dtype
        cast = lambda w: None if w is None else w.detach().to(dtype)  # noqa: E731
        base = model.model
        N, P = mask_N_P.shape
        self.embed = base.embed_tokens.weight
        self.rotary, self.norm = base.rotary_emb, base.norm
        self.lm_head = cast(model.lm_head.weight)
        attn = base.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = attn.config.num_attention_heads, attn.head_dim, attn.scaling
        self.kv_heads = attn.config.num_key_value_heads
        self.apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.layers = []
        for layer, cached in zip(base.layers, cache.layers):
            a, mlp = layer.self_attn, layer.mlp
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            # kept in the compute dtype: attention under autocast would cast the whole cache each step
            keys = cached.keys.new_empty(N, self.kv_heads, capacity, self.head_dim, dtype=dtype)
            values = cached.values.new_empty(N, self.kv_heads, capacity, self.head_dim, dtype=dtype)
            keys[:, :, :P], values[:, :, :P] = cached.keys, cached.values
            self.layers.append(_Layer(
                module=layer,
                qkv=cast(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                qkv_bias=None if biases[0] is None else cast(torch.cat(biases)),
                o=cast(a.o_proj.weight), o_bias=cast(a.o_proj.bias),
                gate_up=cast(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), down=cast(mlp.down_proj.weight),
                keys_N_K_T_D=keys, values_N_K_T_D=values,
            ))
        self.mask_N_T = torch.zeros(N, capacity, dtype=torch.bool, device=mask_N_P.device)
        self.mask_N_T[:, :P] = mask_N_P.bool()
        self.filled = P

    def __call__(self, ids_N: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids_N.device.type, enabled=False):  # casts are explicit: autocast's dispatch per op costs more
            return self._step(ids_N, positions_N)

    def _step(self, ids_N: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
        """What the model's forward computes under autocast: linears and attention in the
        compute dtype, the residual stream, norms and rotary embedding in fp32."""
        t, dtype = self.filled, self.lm_head.dtype
        self.mask_N_T[:, t] = True
        self.filled += 1
        mask_N_1_1_T = self.mask_N_T[:, None, None, : t + 1]
        x_N_1_C = F.embedding(ids_N[:, None], self.embed)
        cos, sin = self.rotary(x_N_1_C, positions_N[:, None])
        N, H, K, D = ids_N.shape[0], self.heads, self.kv_heads, self.head_dim
        for w in self.layers:
            layer, attn = w.module, w.module.self_attn
            qkv = F.linear(rms_norm(layer.input_layernorm, x_N_1_C).to(dtype), w.qkv, w.qkv_bias)
            q, k, v = qkv.view(N, 1, H + 2 * K, D).split([H, K, K], dim=2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before the rotary embedding
                q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
            q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            w.keys_N_K_T_D[:, :, t] = k[:, :, 0]
            w.values_N_K_T_D[:, :, t] = v[:, 0]
            out = F.scaled_dot_product_attention(q.to(dtype), w.keys_N_K_T_D[:, :, : t + 1], w.values_N_K_T_D[:, :, : t + 1],
                                                 attn_mask=mask_N_1_1_T, scale=self.scaling, enable_gqa=H != K)
            x_N_1_C = x_N_1_C + F.linear(out.transpose(1, 2).reshape(N, 1, H * D), w.o, w.o_bias)
            gate, up = F.linear(rms_norm(layer.post_attention_layernorm, x_N_1_C).to(dtype), w.gate_up).chunk(2, dim=-1)
            x_N_1_C = x_N_1_C + F.linear(layer.mlp.act_fn(gate) * up, w.down)
        return F.linear(rms_norm(self.norm, x_N_1_C)[:, 0].to(dtype), self.lm_head)

def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Llama family's RMSNorm (normalize in fp32, round to the input's dtype, scale) as
    one fused kernel where the input is fp32 already, which the residual stream is."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
    return F.rms_norm(x.float(), x.shape[-1:], None, norm.variance_epsilon).to(x.dtype) * norm.weight
