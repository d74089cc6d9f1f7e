"""One decode step of a Llama-family model without transformers' per-token machinery.

Profiled on the bench's 10M Llama (64 rows, bf16 autocast, 2 CPU threads), a generate-style
step spent a quarter of its time growing the KV cache by concatenation (every layer, every
token: quadratic copying), an eighth re-casting fp32 weights to bf16 under autocast, and much
of the rest in small per-module calls. Here the KV cache is preallocated for the whole
answer and written in place, the weights are cast once per sampling call and fused (q, k, v
in one matmul; gate and up in another), and a step is one straight pass over the layers.

The prefill stays transformers' forward (its masks handle any prompt layout); its cache is
copied into the preallocated one. The rotary table is the model's own rotary module's (so its
scaling holds), applied as one complex multiply per q and k; the norms compute what the
family's RMSNorm does and the activation is the model's, so numerics follow the model's
code. Only architectures whose decoder layer is exactly Llama's (pre-norm attention + gated
MLP, optional q/k bias and q/k norms) qualify (`supports`); anything else keeps the generic
step. Shapes: N rows, T cache capacity, H query heads, K key/value heads, D head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


@dataclass
class _Layer:
    module: torch.nn.Module  # the decoder layer: its norm weights and activation are used as they are
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3's per-head norm weights, in the pairs layout
    k_norm: torch.Tensor | None
    keys_N_K_T_D: torch.Tensor
    values_N_K_T_D: torch.Tensor


def supports(model, capacity: int) -> bool:
    """Whether `model` runs the lean step for a cache of `capacity` positions: transformers'
    own class (not remote code of the same name), no MLP biases, a rotary embedding whose
    frequencies do not depend on the sequence's length (dynamic and longrope do), and every
    layer attending to the whole cache."""
    if type(model).__name__ not in SUPPORTED or not type(model).__module__.startswith("transformers.models."):
        return False
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    if getattr(config, "mlp_bias", False) or rope.get("rope_type", "default") not in STATIC_ROPE:
        return False
    if type(model).__name__ in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):  # their layer_types decide the window
        return all(t == "full_attention" for t in config.layer_types)
    window = getattr(config, "sliding_window", None)  # Mistral windows every layer, whatever layer_types says
    return window is None or window >= capacity


def pairs_order(head_dim: int) -> torch.Tensor:
    """The rotary embedding turns dimension i with i + D/2 (transformers' rotate_half). Rows
    of the q and k projections reordered as (0, D/2, 1, D/2 + 1, ...) put each pair side by
    side, so one complex multiply rotates them; attention scores are unchanged because q and k
    share the order, and v keeps its own."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


class LeanStep:
    """Built after the prefill from its filled DynamicCache (N rows, P positions); each call
    feeds one token per row and returns the next-token logits."""

    def __init__(self, model, cache, mask_N_P: torch.Tensor, capacity: int) -> None:
        device = mask_N_P.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
        cast = lambda w: None if w is None else w.detach().to(dtype)  # noqa: E731
        base = model.model
        N, P = mask_N_P.shape
        attn = base.layers[0].self_attn
        H, K, D = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
        self.heads, self.kv_heads, self.head_dim, self.scaling = H, K, D, attn.scaling
        self.embed, self.norm = base.embed_tokens.weight, base.norm
        self.lm_head = cast(model.lm_head.weight)
        order = pairs_order(D).to(device)
        heads = lambda w, n: None if w is None else w.view(n, D, *w.shape[1:])[:, order].reshape(w.shape)  # noqa: E731
        with torch.autocast(device.type, enabled=False):
            cos, sin = base.rotary_emb(self.embed[:1].float(), torch.arange(capacity, device=device)[None])
        self.rotation_T_D2 = torch.complex(cos[0, :, : D // 2], sin[0, :, : D // 2])  # rotary scaling included
        self.layers = []
        for layer, cached in zip(base.layers, cache.layers):
            a, mlp = layer.self_attn, layer.mlp
            # kept in the compute dtype: attention under autocast would cast the whole cache each step
            keys = cached.keys.new_empty(N, K, capacity, D, dtype=dtype)
            values = cached.values.new_empty(N, K, capacity, D, dtype=dtype)
            keys[:, :, :P], values[:, :, :P] = cached.keys[..., order], cached.values
            qkv = [heads(a.q_proj.weight, H), heads(a.k_proj.weight, K), a.v_proj.weight]
            biases = [heads(a.q_proj.bias, H), heads(a.k_proj.bias, K), a.v_proj.bias]
            q_norm, k_norm = (getattr(a, name, None) for name in ("q_norm", "k_norm"))
            self.layers.append(_Layer(
                module=layer, qkv=cast(torch.cat(qkv)), qkv_bias=None if biases[0] is None else cast(torch.cat(biases)),
                o=cast(a.o_proj.weight), o_bias=cast(a.o_proj.bias),
                gate_up=cast(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), down=cast(mlp.down_proj.weight),
                q_norm=None if q_norm is None else q_norm.weight[order], k_norm=None if k_norm is None else k_norm.weight[order],
                keys_N_K_T_D=keys, values_N_K_T_D=values,
            ))
        self.eps = base.norm.variance_epsilon
        self.mask_N_T = torch.zeros(N, capacity, dtype=torch.bool, device=device)
        self.mask_N_T[:, :P] = mask_N_P.bool()
        self.filled = P

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished ones leave the batch)."""
        for w in self.layers:
            w.keys_N_K_T_D, w.values_N_K_T_D = w.keys_N_K_T_D[rows], w.values_N_K_T_D[rows]
        self.mask_N_T = self.mask_N_T[rows]

    def __call__(self, ids_N: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids_N.device.type, enabled=False):  # casts are explicit: autocast's dispatch per op costs more
            return self._step(ids_N, positions_N)

    def _step(self, ids_N: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
        """What the model's forward computes under autocast: linears and attention in the
        compute dtype, the residual stream, norms and rotary embedding in fp32."""
        t, dtype, eps = self.filled, self.lm_head.dtype, self.eps
        self.mask_N_T[:, t] = True
        self.filled += 1
        mask_N_1_1_T = self.mask_N_T[:, None, None, : t + 1]
        rotation_N_1_1_D2 = self.rotation_T_D2[positions_N][:, None, None]
        x_N_1_C = F.embedding(ids_N[:, None], self.embed)
        N, H, K, D = ids_N.shape[0], self.heads, self.kv_heads, self.head_dim

        def rotate(x_N_1_h_D: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(x_N_1_h_D.float().unflatten(-1, (D // 2, 2)))
            return torch.view_as_real(pairs * rotation_N_1_1_D2).flatten(-2).transpose(1, 2)

        for w in self.layers:
            layer = w.module
            qkv = F.linear(rms_norm(x_N_1_C, layer.input_layernorm.weight, eps).to(dtype), w.qkv, w.qkv_bias)
            q, k, v = qkv.view(N, 1, H + 2 * K, D).split([H, K, K], dim=2)
            if w.q_norm is not None:  # Qwen3 normalizes each head before the rotary embedding
                q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
            q, k = rotate(q), rotate(k)
            w.keys_N_K_T_D[:, :, t] = k[:, :, 0]
            w.values_N_K_T_D[:, :, t] = v[:, 0]
            out = F.scaled_dot_product_attention(q.to(dtype), w.keys_N_K_T_D[:, :, : t + 1], w.values_N_K_T_D[:, :, : t + 1],
                                                 attn_mask=mask_N_1_1_T, scale=self.scaling, enable_gqa=H != K)
            x_N_1_C = x_N_1_C + F.linear(out.transpose(1, 2).reshape(N, 1, H * D), w.o, w.o_bias)
            hidden = rms_norm(x_N_1_C, layer.post_attention_layernorm.weight, eps).to(dtype)
            gate, up = F.linear(hidden, w.gate_up).chunk(2, dim=-1)
            x_N_1_C = x_N_1_C + F.linear(layer.mlp.act_fn(gate) * up, w.down)
        return F.linear(rms_norm(x_N_1_C, self.norm.weight, eps)[:, 0].to(dtype), self.lm_head)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama family's RMSNorm (normalize in fp32, round to the input's dtype, scale) as
    one fused kernel where the input is fp32 already, which the residual stream is."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype) * weight
