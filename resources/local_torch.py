"""LocalTorchBackend: the training-backend port on PyTorch + transformers (CPU or GPU; full
fine-tune or LoRA through peft). Master weights stay fp32; bf16 is autocast where the
hardware runs it natively."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dagster import ConfigurableResource
from pydantic import Field
from safetensors.torch import load_file, save_file

from resources.hf_io import load_model, load_tokenizer
from resources.losses import BUILTIN_LOSSES
from resources.training_backend import (
    AdamParams,
    CustomLossFn,
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SamplingParams,
)


class LocalTorchBackend(ConfigurableResource):
    """Trains in this process with PyTorch."""

    device: str = Field(default="auto", description="auto | cpu | cuda")
    precision: str = Field(default="auto", description="auto | fp32 | bf16 (autocast, fp32 master weights)")
    micro_batch_size: int = Field(default=0, description="split forward/backward into chunks of this many sequences; 0 = whole batch")
    trust_remote_code: bool = False

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        if self.resolved_device() == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # measured here: bf16 autocast on CPU ran the tiny recipe model 20x slower than fp32
        # (per-op casts dominate at this size), so CPUs default to fp32
        return "fp32"

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "local_torch",
            "device": self.resolved_device(),
            "precision": self.resolved_precision(),
            "torch": torch.__version__,
        }

    def create_training_client(self, base_model: Path, lora_rank: int = 0, seed: int = 0) -> LocalTrainingClient:
        return LocalTrainingClient(
            base_model,
            lora_rank=lora_rank,
            seed=seed,
            device=self.resolved_device(),
            bf16=self.resolved_precision() == "bf16",
            micro_batch_size=self.micro_batch_size,
            trust_remote_code=self.trust_remote_code,
        )


class LocalTrainingClient:
    def __init__(
        self,
        base_model: Path,
        lora_rank: int,
        seed: int,
        device: str,
        bf16: bool,
        micro_batch_size: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        self.base_model, self.lora_rank, self.device = Path(base_model), lora_rank, device
        self.bf16, self.micro_batch_size = bf16, micro_batch_size
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

    def _collate(self, data: list[Datum]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Right-pad to the longest datum; padding gets mask 0 and contributes nothing."""
        T = max(len(d.model_input) for d in data)
        B = len(data)
        input_ids_B_T = torch.zeros(B, T, dtype=torch.long)
        mask_B_T = torch.zeros(B, T)
        keys = set().union(*(d.loss_fn_inputs for d in data))
        inputs = {k: torch.zeros(B, T, dtype=torch.long if k == "target_tokens" else torch.float32) for k in keys}
        for i, d in enumerate(data):
            n = len(d.model_input)
            input_ids_B_T[i, :n] = torch.tensor(d.model_input)
            mask_B_T[i, :n] = 1.0
            for k, v in d.loss_fn_inputs.items():
                inputs[k][i, :n] = torch.tensor(v, dtype=inputs[k].dtype)
        inputs["mask"] = mask_B_T
        dev = self.device
        return input_ids_B_T.to(dev), mask_B_T.to(dev), {k: v.to(dev) for k, v in inputs.items()}

    def _target_logprobs(self, input_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, targets_B_T: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits_B_T_V = self.model(input_ids=input_ids_B_T, attention_mask=mask_B_T.long()).logits
        nll = F.cross_entropy(logits_B_T_V.float().flatten(0, 1), targets_B_T.flatten(), reduction="none")
        return -nll.view_as(targets_B_T) * mask_B_T

    def _chunks(self, data: list[Datum]) -> list[list[Datum]]:
        size = self.micro_batch_size or len(data)
        return [data[i : i + size] for i in range(0, len(data), size)]

    def _run(self, data: list[Datum], loss_of) -> ForwardBackwardOutput:
        """Forward and backward chunk by chunk; losses are sums, so chunk gradients add up."""
        self.model.train()
        outputs, totals = [], {}
        for chunk in self._chunks(data):
            input_ids, mask, inputs = self._collate(chunk)
            logprobs_B_T = self._target_logprobs(input_ids, mask, inputs["target_tokens"])
            loss, metrics = loss_of(chunk, logprobs_B_T, inputs)
            loss.backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            outputs += [{"logprobs": logprobs_B_T[i, : len(d.model_input)].detach().cpu()} for i, d in enumerate(chunk)]
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=totals)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        if loss_fn not in BUILTIN_LOSSES:
            raise ValueError(f"unknown loss_fn {loss_fn!r}; built-in losses are {sorted(BUILTIN_LOSSES)}")
        fn = BUILTIN_LOSSES[loss_fn]
        return self._run(data, lambda chunk, lp, inputs: fn(lp, inputs, loss_fn_config or {}))

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        def loss_of(chunk, logprobs_B_T, inputs):
            per_datum = [logprobs_B_T[i, : len(d.model_input)] for i, d in enumerate(chunk)]
            return fn(chunk, per_datum)

        if self.micro_batch_size and self.micro_batch_size < len(data):
            raise ValueError("forward_backward_custom needs the whole batch in one chunk (pairwise losses)")
        return self._run(data, loss_of)

    @torch.no_grad()
    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token given its prefix: len(seq) - 1 values, aligned with seq[1:]."""
        self.model.eval()
        result: list[list[float]] = []
        data = [Datum(model_input=s[:-1], loss_fn_inputs={"target_tokens": s[1:]}) for s in sequences]
        for chunk in self._chunks(data):
            input_ids, mask, inputs = self._collate(chunk)
            lp = self._target_logprobs(input_ids, mask, inputs["target_tokens"]).cpu()
            result += [lp[i, : len(d.model_input)].tolist() for i, d in enumerate(chunk)]
        return result

    # -- optimizer -------------------------------------------------------------------------

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ensure_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self._trainable(), lr=0.0, foreach=False)
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
        T = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
        attention = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):  # left-pad so every prompt ends where generation starts
            input_ids[i, T - len(p) :] = torch.tensor(p)
            attention[i, T - len(p) :] = 1
        greedy = sampling_params.temperature <= 0
        torch.manual_seed(sampling_params.seed)
        with self._autocast():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=sampling_params.max_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling_params.temperature,
                top_p=None if greedy else sampling_params.top_p,
                top_k=None,
                num_return_sequences=num_samples,
                stop_strings=sampling_params.stop or None,
                tokenizer=tok if sampling_params.stop else None,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = out.sequences[:, T:].cpu()
        scale = 1.0 if greedy else sampling_params.temperature
        logits_N_S_V = torch.stack(out.logits, dim=1).float().cpu() / scale
        logprobs_N_S = torch.log_softmax(logits_N_S_V, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results: list[list[SampledSequence]] = []
        for n in range(new_tokens.shape[0]):
            seq, lps = new_tokens[n].tolist(), logprobs_N_S[n].tolist()
            end, reason = len(seq), "length"
            for j, t in enumerate(seq):
                if t == tok.eos_token_id or _ends_with_stop(tok, seq[: j + 1], sampling_params.stop):
                    end, reason = j + 1, "stop"
                    break
            if n % num_samples == 0:
                results.append([])
            results[-1].append(SampledSequence(tokens=seq[:end], logprobs=lps[:end], stop_reason=reason))
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


def _ends_with_stop(tok, tokens: list[int], stops: list[str]) -> bool:
    if not stops:
        return False
    tail = tok.decode(tokens[-8:])
    return any(tail.endswith(s) for s in stops)
