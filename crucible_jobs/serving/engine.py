"""Continuous batching for `crucible serve`: one thread owns the model and runs a decode loop
over every active row (a row is one choice of one request). Between two decode steps it
admits waiting requests: their prompts are prefilled together, and their KV cache is
left-padded to the running batch's length and joined to it, so a request starts at the next
step instead of waiting for the batch in flight to end. Finished rows leave at once, and the
cache columns no active row attends to any more are cut, so the cache is as long as the
longest live row, not as old as the server.

Each row samples with its own temperature, top_p and generator (seeded from the request's
`seed` and the choice index), so a seeded request draws the same tokens whatever else is in
the batch (up to the last bits of batched matmuls). Stop strings are matched on the decoded
text and never sent: text that could still become a stop string is held back.

A model swap (the served alias moved) is handed in with `swap`; the loop stops admitting,
lets the rows in flight finish on the old weights, then serves every later request from the
new one. Each request learns the exact version that answered it when it is admitted.

Shapes: N = active rows, L = cache length (left-padded), V = vocabulary."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from transformers import DynamicCache

from resources.backends.local.decode import cache_argument


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    version: str  # the registry version, e.g. "sl_basic:3"
    context_length: int
    stop_ids: list[int]
    device: str = "cpu"

    @property
    def cache_arg(self) -> str:
        return cache_argument(self.model)


@dataclass
class Request:
    """`render(tokenizer)` gives the prompt's ids with the tokenizer of the model that admits
    it; `sink(event)` receives ("admitted", version, prompt_tokens), ("text", choice, delta),
    ("done", choice, finish_reason, completion_tokens) and ("error", status, message, code)."""

    render: Callable[[object], list[int]]
    sink: Callable[[tuple], None]
    n: int = 1
    max_tokens: int | None = None  # None: up to the engine's default_max_tokens, within the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    version: str | None = None  # asked for one exact version (model "chat_sl:3"): refused if another one serves now
    cancelled: bool = False  # the client went away: its rows leave at the next step, a queued request never starts


@dataclass
class Row:
    request: Request
    choice: int
    generator: torch.Generator
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent


class ContextTooLong(ValueError):
    pass


class BatchingEngine:
    def __init__(self, loaded: LoadedModel, max_rows: int = 64, default_max_tokens: int = 256,
                 on_step: Callable[[int], None] | None = None):
        self.loaded, self.max_rows, self.default_max_tokens = loaded, max_rows, default_max_tokens
        self.on_step = on_step or (lambda rows: None)  # called with the batch size of every decode step
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._next: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # a swap() between reading _next and clearing it is never lost
        self._held: Request | None = None  # taken from the queue while draining for a swap
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="crucible-serve-engine", daemon=True)
        self.rows: list[Row] = []
        self._cache = self._mask_N_L = self._pos_N = self._logits_N_V = None

    def start(self) -> BatchingEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        self._waiting.put(request)

    def swap(self, loaded: LoadedModel) -> None:
        with self._swap_lock:
            self._next = loaded

    def _take_swap(self) -> None:
        with self._swap_lock:
            if self._next is not None:
                self.loaded, self._next = self._next, None

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.rows:
                    self._take_swap()
                self._step()
        finally:  # stopped, or a bug: no caller waits forever
            for request in self._everyone([]):
                try:
                    request.sink(("error", 503, "the server is shutting down" if self._stopping.is_set()
                                  else "the decode loop stopped", None))
                except RuntimeError:  # its event loop is already closed
                    pass

    def _step(self) -> None:
        admitted = self._admit()
        if not self.rows and not admitted:
            return
        try:
            with torch.no_grad():
                if admitted:
                    self._prefill(admitted)
                self._sample_and_emit()
                if self.rows:
                    self._forward()
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving the next ones
            for request in {id(r): r for r in [row.request for row in self.rows] + [r for r, _, _ in admitted]}.values():
                request.sink(("error", 500, f"generation failed: {type(e).__name__}: {e}", None))
            self.rows = []
            self._cache = self._mask_N_L = self._pos_N = self._logits_N_V = None

    def _everyone(self, admitted: list) -> list[Request]:
        """Every request the engine holds: running, held for a swap, queued."""
        held = [self._held] if self._held else []
        queued = []
        while True:
            try:
                queued.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        running = [row.request for row in self.rows] + [r for r, _, _ in admitted]
        return list({id(r): r for r in running + held + queued}.values())

    def _admit(self) -> list[tuple[Request, list[int], int]]:
        """Waiting requests that fit (all of them when nothing runs), rendered and checked.
        Once a swap is pending, the next request waits until the rows in flight are done,
        then is the first the new model answers."""
        admitted, rows = [], len(self.rows)
        while rows < self.max_rows:
            request, self._held = self._held, None
            try:
                request = request or (self._waiting.get(timeout=0.05) if not self.rows and not admitted
                                      else self._waiting.get_nowait())
            except queue.Empty:
                break
            if request.cancelled:
                continue
            if self._next is not None:
                if self.rows or admitted:
                    self._held = request
                    break
                self._take_swap()
            if request.version and request.version != self.loaded.version:
                request.sink(("error", 404, f"{request.version} is no longer served here: {self.loaded.version} is", "model_not_found"))
                continue
            try:
                prompt = request.render(self.loaded.tokenizer)
                room = self.loaded.context_length - len(prompt)
                max_tokens = request.max_tokens or min(self.default_max_tokens, room)
                if max_tokens > room or room < 1:
                    raise ContextTooLong(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                         f"model's context length of {self.loaded.context_length} tokens")
            except ContextTooLong as e:
                request.sink(("error", 400, str(e), "context_length_exceeded"))
                continue
            except Exception as e:  # noqa: BLE001 - a chat template that refuses these messages, say
                request.sink(("error", 400, f"cannot render the prompt: {type(e).__name__}: {e}", None))
                continue
            request.sink(("admitted", self.loaded.version, len(prompt)))
            admitted.append((request, prompt, max_tokens))
            rows += request.n
        return admitted

    def _prefill(self, admitted: list[tuple[Request, list[int], int]]) -> None:
        """One left-padded forward over the new prompts; each prompt's cache row is repeated
        for its n choices and joined to the running batch."""
        device, pad = self.loaded.device, self.loaded.stop_ids[0]
        P = max(len(p) for _, p, _ in admitted)
        ids_B_P = torch.full((len(admitted), P), pad, dtype=torch.long)
        mask_B_P = torch.zeros(len(admitted), P, dtype=torch.long)
        for i, (_, p, _) in enumerate(admitted):
            ids_B_P[i, P - len(p):] = torch.tensor(p)
            mask_B_P[i, P - len(p):] = 1
        ids_B_P, mask_B_P = ids_B_P.to(device), mask_B_P.to(device)
        pos_B_P = (mask_B_P.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.loaded.model(input_ids=ids_B_P, attention_mask=mask_B_P, position_ids=pos_B_P, use_cache=True,
                                logits_to_keep=1, **{self.loaded.cache_arg: cache})  # filled in place
        repeat = torch.tensor([i for i, (r, _, _) in enumerate(admitted) for _ in range(r.n)], device=device)
        layers = [(k[repeat], v[repeat]) for k, v in _kv(cache)]
        new_rows = [Row(r, c, _generator(r.seed, c, device), m) for r, _, m in admitted for c in range(r.n)]
        mask_N_P, pos_N, logits_N_V = mask_B_P[repeat], pos_B_P[repeat, -1] + 1, out.logits[repeat, -1].float()
        if self.rows:
            layers, mask_N_P = _join(_kv(self._cache), self._mask_N_L, layers, mask_N_P)
            pos_N, logits_N_V = torch.cat([self._pos_N, pos_N]), torch.cat([self._logits_N_V, logits_N_V])
        self._set_cache(layers)
        self.rows += new_rows
        self._mask_N_L, self._pos_N, self._logits_N_V = mask_N_P, pos_N, logits_N_V

    def _sample_and_emit(self) -> None:
        self.on_step(len(self.rows))
        ids_N = _sample(self._logits_N_V, self.rows)
        self._ids_N = ids_N
        keep = []
        tok, stop_ids = self.loaded.tokenizer, self.loaded.stop_ids
        for n, (row, token) in enumerate(zip(self.rows, ids_N.tolist())):
            r = row.request
            if r.cancelled:
                continue
            finish = "stop" if token in stop_ids else None
            if finish is None:
                row.tokens.append(token)
            text = tok.decode(row.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None and len(row.tokens) >= row.max_tokens:
                finish = "length"
            end = len(text) if finish else _safe_end(text, r.stop)
            if end > row.sent:
                r.sink(("text", row.choice, text[row.sent:end]))
                row.sent = end
            if finish:
                r.sink(("done", row.choice, finish, len(row.tokens)))
            else:
                keep.append(n)
        if len(keep) < len(self.rows):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep these rows; cut the leading cache columns none of them attends to."""
        self.rows = [self.rows[n] for n in keep]
        if not self.rows:
            self._cache = self._mask_N_L = self._pos_N = self._logits_N_V = None
            return
        idx = torch.tensor(keep, device=self._mask_N_L.device)
        mask_N_L = self._mask_N_L[idx]
        first = int(mask_N_L.any(0).nonzero()[0])
        self._set_cache([(k[idx, :, first:], v[idx, :, first:]) for k, v in _kv(self._cache)])
        self._mask_N_L, self._pos_N, self._ids_N = mask_N_L[:, first:], self._pos_N[idx], self._ids_N[idx]

    def _forward(self) -> None:
        N = len(self.rows)
        self._mask_N_L = torch.cat([self._mask_N_L, torch.ones(N, 1, dtype=self._mask_N_L.dtype, device=self._mask_N_L.device)], 1)
        out = self.loaded.model(input_ids=self._ids_N.unsqueeze(-1), attention_mask=self._mask_N_L,
                                position_ids=self._pos_N.unsqueeze(-1), use_cache=True, **{self.loaded.cache_arg: self._cache})
        self._pos_N = self._pos_N + 1
        self._logits_N_V = out.logits[:, -1].float()

    def _set_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._cache = DynamicCache(ddp_cache_data=layers)


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _join(a, mask_a, b, mask_b):
    """Two batches' caches and masks as one: the shorter is left-padded (masked out)."""
    L = max(mask_a.shape[1], mask_b.shape[1])

    def pad(kv, mask):
        extra = L - mask.shape[1]
        return [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in kv], F.pad(mask, (extra, 0))

    (a, mask_a), (b, mask_b) = pad(a, mask_a), pad(b, mask_b)
    return [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a, b)], torch.cat([mask_a, mask_b])


def _generator(seed: int | None, choice: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed * 1_000_003 + choice) % 2**63)
    return g


def _sample(logits_N_V: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Each row's next id, on the model's device: argmax at temperature 0, else a draw from
    softmax(logits / T) restricted to the top_p nucleus, with the row's own generator."""
    device = logits_N_V.device
    temps_N = torch.tensor([r.request.temperature for r in rows], device=device)
    top_p_N = torch.tensor([r.request.top_p for r in rows], device=device)
    probs_N_V = torch.softmax(logits_N_V / temps_N.clamp(min=1e-6).unsqueeze(-1), dim=-1)
    if bool((top_p_N < 1).any()):
        sorted_N_V, order_N_V = probs_N_V.sort(dim=-1, descending=True)
        outside_N_V = sorted_N_V.cumsum(-1) - sorted_N_V > top_p_N.unsqueeze(-1)  # the top token always stays
        probs_N_V = probs_N_V.scatter(-1, order_N_V, sorted_N_V.masked_fill(outside_N_V, 0.0))
    ids_N = logits_N_V.argmax(dim=-1)
    for n, r in enumerate(rows):
        if r.request.temperature > 0:
            ids_N[n] = torch.multinomial(probs_N_V[n], 1, generator=r.generator)[0]
    return ids_N


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: not a tail that could grow into a stop string, nor a
    half-decoded character."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end
