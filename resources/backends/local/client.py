"""LocalTrainingClient: the training-backend port on PyTorch + transformers (CPU or GPU; full
fine-tune or LoRA through peft). Master weights stay fp32; bf16 is autocast where the
hardware runs it natively. Made by LocalTorchBackend (resources/backends/local/backend.py), which
imports this module only when a client is needed, so a run of cache hits never loads torch."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from resources.hf_io import load_model, load_tokenizer
from resources.backends.local.decode import decode
from resources.backends.local.losses import BUILTIN_LOSSES
from resources.backends.local.packing import auto_capacity, block_causal_mask, pack
from resources.backends.types import (
    AdamParams,
    CustomLossFn,
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SamplingParams,
)


@dataclass
class Batch:
    """Data laid out in rows; `slots[i]` = (row, offset, length) of datum i."""

    input_ids_R_L: torch.Tensor
    positions_R_L: torch.Tensor
    attention_R_1_L_L: torch.Tensor
    inputs: dict[str, torch.Tensor]
    slots: list[tuple[int, int, int]]

    def per_datum(self, values_R_L: torch.Tensor) -> list[torch.Tensor]:
        return [values_R_L[r, o : o + n] for r, o, n in self.slots]


class LocalTrainingClient:
    def __init__(
        self,
        base_model: Path,
        lora_rank: int,
        seed: int,
        device: str,
        bf16: bool,
        micro_batch_size: int = 0,
        packing: bool = True,
        pack_length: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        self.base_model, self.lora_rank, self.device = Path(base_model), lora_rank, device
        self.bf16, self.micro_batch_size = bf16, micro_batch_size
        self.packing, self.pack_length = packing, pack_length
        self.trust_remote_code = trust_remote_code
        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(base_model, trust_remote_code)
        self.model = self._build_model(base_model)
        self.optimizer: torch.optim.Optimizer | None = None

    def _build_model(self, weights_dir: Path) -> torch.nn.Module:
        model = load_model(weights_dir, self.device, self.trust_remote_code)
        if self.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(model, config)
        return model

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    # -- forward ---------------------------------------------------------------------------

    def _collate(self, data: list[Datum]) -> Batch:
        """Lay the data out in rows: packed (several per row, isolated by the mask) or one
        per row. Padding gets mask 0 and contributes nothing."""
        lengths = [len(d.model_input) for d in data]
        rows = [[i] for i in range(len(data))]
        if self.packing:
            # rough, measured on CPU (bench/): masked attention over a packed row costs about
            # as much as the linear layers once the row is ~8 x hidden_size long
            scale = 8 * self.model.config.hidden_size
            capacity = max(max(lengths), self.pack_length) if self.pack_length else auto_capacity(lengths, scale)
            rows = pack(lengths, capacity)
        R, L = len(rows), max(sum(lengths[i] for i in row) for row in rows)
        input_ids_R_L = torch.zeros(R, L, dtype=torch.long)
        positions_R_L = torch.zeros(R, L, dtype=torch.long)
        segments_R_L = torch.full((R, L), -1, dtype=torch.long)
        keys = set().union(*(d.loss_fn_inputs for d in data))
        inputs = {k: torch.zeros(R, L, dtype=torch.long if k == "target_tokens" else torch.float32) for k in keys}
        slots: list[tuple[int, int, int]] = [(0, 0, 0)] * len(data)
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                d, n = data[i], lengths[i]
                span = slice(offset, offset + n)
                input_ids_R_L[r, span] = torch.tensor(d.model_input)
                positions_R_L[r, span] = torch.arange(n)
                segments_R_L[r, span] = i
                for k, v in d.loss_fn_inputs.items():
                    inputs[k][r, span] = torch.tensor(v, dtype=inputs[k].dtype)
                slots[i] = (r, offset, n)
                offset += n
        inputs["mask"] = (segments_R_L >= 0).float()
        dev = self.device
        return Batch(
            input_ids_R_L=input_ids_R_L.to(dev),
            positions_R_L=positions_R_L.to(dev),
            attention_R_1_L_L=block_causal_mask(segments_R_L).to(dev),
            inputs={k: v.to(dev) for k, v in inputs.items()},
            slots=slots,
        )

    def _target_logprobs(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            logits_R_L_V = self._module()(input_ids=batch.input_ids_R_L, position_ids=batch.positions_R_L,
                                      attention_mask=batch.attention_R_1_L_L).logits
        targets_R_L = batch.inputs["target_tokens"]
        nll = F.cross_entropy(logits_R_L_V.float().flatten(0, 1), targets_R_L.flatten(), reduction="none")
        return -nll.view_as(targets_R_L) * batch.inputs["mask"]

    def _module(self) -> torch.nn.Module:
        """What the forward pass calls; data parallelism wraps the model here."""
        return self.model

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _chunks(self, data: list[Datum]) -> list[list[Datum]]:
        size = self.micro_batch_size or len(data)
        return [data[i : i + size] for i in range(0, len(data), size)]

    def _run(self, data: list[Datum], loss_of) -> ForwardBackwardOutput:
        """Forward and backward chunk by chunk; losses are sums, so chunk gradients add up."""
        self.model.train()
        outputs, totals = [], {}
        for chunk in self._chunks(data):
            batch = self._collate(chunk)
            logprobs_R_L = self._target_logprobs(batch)
            loss, metrics = loss_of(batch, logprobs_R_L)
            self._backward(loss)
            layout = {"tokens:real": batch.inputs["mask"].sum().item(), "tokens:slots": batch.inputs["mask"].numel()}
            for k, v in (metrics | layout).items():
                totals[k] = totals.get(k, 0.0) + v
            outputs += [{"logprobs": lp.detach().cpu()} for lp in batch.per_datum(logprobs_R_L)]
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=totals)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        if loss_fn not in BUILTIN_LOSSES:
            raise ValueError(f"unknown loss_fn {loss_fn!r}; built-in losses are {sorted(BUILTIN_LOSSES)}")
        fn = BUILTIN_LOSSES[loss_fn]
        return self._run(data, lambda batch, logprobs_R_L: fn(logprobs_R_L, batch.inputs, loss_fn_config or {}))

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        if self.micro_batch_size and self.micro_batch_size < len(data):
            raise ValueError("forward_backward_custom needs the whole batch in one chunk (pairwise losses)")
        return self._run(data, lambda batch, logprobs_R_L: fn(data, batch.per_datum(logprobs_R_L)))

    @torch.no_grad()
    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token given its prefix: len(seq) - 1 values, aligned with seq[1:]."""
        self.model.eval()
        result: list[list[float]] = []
        data = [Datum(model_input=s[:-1], loss_fn_inputs={"target_tokens": s[1:]}) for s in sequences]
        for chunk in self._chunks(data):
            batch = self._collate(chunk)
            result += [lp.tolist() for lp in batch.per_datum(self._target_logprobs(batch).cpu())]
        return result

    # -- optimizer -------------------------------------------------------------------------

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ensure_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            # fused: one kernel over every weight instead of a Python loop of small ones (the
            # loop was 63 of a step's ms on the ~10M bench model); steps stay bit-deterministic
            self.optimizer = torch.optim.AdamW(self._trainable(), lr=0.0, fused=True)
        return self.optimizer

    def optim_step(self, adam_params: AdamParams) -> dict[str, float]:
        opt = self._ensure_optimizer()
        for group in opt.param_groups:
            group.update(
                lr=adam_params.learning_rate,
                betas=(adam_params.beta1, adam_params.beta2),
                eps=adam_params.eps,
                weight_decay=adam_params.weight_decay,
            )
        max_norm = adam_params.grad_clip_norm if adam_params.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm)}

    # -- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], num_samples: int, sampling_params: SamplingParams) -> list[list[SampledSequence]]:
        self.model.eval()
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # a stop string that is one special token (an end-of-turn marker) stops by id, cheaply
        vocab = tok.get_vocab()
        stop_ids = [vocab[s] for s in sampling_params.stop if s in vocab and s in tok.all_special_tokens + list(tok.get_added_vocab())]
        stop_strings = [s for s in sampling_params.stop if s not in vocab or vocab[s] not in stop_ids]
        with self._autocast():
            out = decode(self.model, prompts, num_samples, sampling_params.max_tokens, sampling_params.temperature,
                         sampling_params.top_p, sampling_params.seed, pad_id, [tok.eos_token_id, *stop_ids], stop_strings,
                         tok, self.device)
        results: list[list[SampledSequence]] = []
        for n, stopped_at in enumerate(out.stopped_at_N):
            end = stopped_at + 1 if stopped_at >= 0 else out.tokens_N_S.shape[1]
            if n % num_samples == 0:
                results.append([])
            results[-1].append(SampledSequence(tokens=out.tokens_N_S[n, :end].tolist(), logprobs=out.logprobs_N_S[n, :end].tolist(),
                                               stop_reason="stop" if stopped_at >= 0 else "length"))
        return results

    # -- state -----------------------------------------------------------------------------

    def save_state(self, path: Path) -> None:
        """Weights (adapter only under LoRA) and optimizer state, all safetensors + JSON."""
        path = Path(path)
        self.model.save_pretrained(path / "model", safe_serialization=True)
        opt = self._ensure_optimizer().state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
        save_file(tensors, path / "optimizer.safetensors")
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        (path / "optimizer.json").write_text(json.dumps(groups, sort_keys=True))

    def load_state(self, path: Path, with_optimizer: bool = True) -> None:
        path = Path(path)
        if self.lora_rank > 0:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(path / "model" / "adapter_model.safetensors", device=self.device))
        else:
            self.model = self._build_model(path / "model")
        self.optimizer = None
        if not with_optimizer:
            return
        opt = self._ensure_optimizer()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in load_file(path / "optimizer.safetensors", device=self.device).items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = tensor
        groups = json.loads((path / "optimizer.json").read_text())
        opt.load_state_dict({"state": state, "param_groups": groups})

    def save_weights_for_sampler(self, path: Path) -> None:
        """A plain HF model dir (LoRA merged in) that `from_pretrained` loads anywhere."""
        model = self.model
        if self.lora_rank > 0:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
