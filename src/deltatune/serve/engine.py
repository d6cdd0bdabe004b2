"""The multi-adapter serving engine: continuous batching over a llama-family HF model.

One forward serves rows that use different adapters (or none). The engine wraps every linear
projection of the decoder layers with a :class:`ServedLoraBranch` (through the core's
``install_branch``, so the model's own forward runs unchanged) that adds the LoRA term of each
row's resident adapter with :func:`~deltatune.serve.batched_lora.add_batched_lora`, using the
row → adapter-slot indices the engine sets before each forward. The decoder layers are the HF
modules themselves; the engine supplies positions, a per-row attention mask and a
:class:`~deltatune.serve.kv_cache.StepCache` in place of transformers' cache.

    engine = Engine("smollm2-135m-instruct", "adapters/")
    engine.generate(["Hello"], adapters=["support-bot"], sampling=SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.core.inject import install_branch, iter_logical_modules, iter_wrappers, remove_branch
from deltatune.serve.adapter_pool import AdapterNotFoundError, AdapterPool, resolve_lora_dtype
from deltatune.serve.cpu_kernel import bgmv_kernel
from deltatune.serve.detokenize import IncrementalDecoder
from deltatune.serve.errors import EngineError, QueueFullError, RequestError
from deltatune.serve.kv_cache import SlotKVCache, attention_mask
from deltatune.serve.lora_branch import LoraContext, ServedLoraBranch
from deltatune.serve.sampling import SamplingParams, choose_tokens, held_back, make_generator, stop_hit
from deltatune.serve.scheduler import Request, Scheduler
from deltatune.utils.errors import ConfigError, DeltatuneError
from deltatune.utils.hf_cache import cache_arg_name

log = logging.getLogger(__name__)
SERVE_BRANCH = "_serve_lora"
SUPPORTED = ("llama",)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    adapter: str | None


class Engine:
    """``model``: an alias/path (loaded with its tokenizer) or a llama-family ``*ForCausalLM``.

    ``max_batch`` KV slots of ``max_len`` tokens each (prompt + completion); ``lora_slots`` resident
    adapters of rank ≤ ``max_lora_rank``; ``prefill_budget`` prompt tokens per step. ``lora_dtype``: how the
    resident adapters are stored (default: the model's dtype). ``"bfloat16"`` under an fp32 model
    halves the adapter bytes a decode step reads (the LoRA term is still computed in fp32, so only the
    weights' rounding differs; S-LoRA keeps adapters in half precision too)."""

    def __init__(self, model, adapters_dir: str | Path | None = None, tokenizer=None, *, max_batch: int = 32, max_len: int = 1024,
                 lora_slots: int = 8, max_lora_rank: int = 16, prefill_budget: int = 256, name: str | None = None,
                 lora_dtype: str | torch.dtype | None = None, max_queue: int = 1024):
        if isinstance(model, (str, os.PathLike)):
            from deltatune.models.load import load_model, load_tokenizer

            name = name or str(model)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
            model = load_model(model, task="causal-lm")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED or not hasattr(model, "lm_head"):
            raise ConfigError(f"the serving engine runs llama-family causal LMs ({', '.join(SUPPORTED)}); got {type(model).__name__} ({model_type!r})")
        if tokenizer is None:
            raise ConfigError("Engine needs the model's tokenizer (pass tokenizer=...)")
        if next(iter_wrappers(model), None) is not None:
            raise ConfigError("the model already has deltas attached; serve the plain base model and put adapters in the adapters directory (or merge first)")
        if min(max_batch, max_len, prefill_budget, max_queue) < 1:
            raise ConfigError(f"max_batch, max_len, prefill_budget and max_queue must be >= 1 (got {max_batch}, {max_len}, {prefill_budget}, {max_queue})")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or "base"
        cfg = model.config
        param = next(model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = SlotKVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, max_len, head_dim, param.dtype, param.device)
        self.max_len, self.max_queue = max_len, max_queue
        # A token covers at most this many characters, so a longer text is refused before tokenizing.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) + 1
        self.cache_arg = cache_arg_name(model.model.layers[0])  # 'cache' from transformers 5.25
        self.ctx = LoraContext()
        self.pool = None
        self._wrapped: list[str] = []
        if adapters_dir is not None:
            if not Path(adapters_dir).is_dir():
                raise ConfigError(f"adapters directory {str(adapters_dir)!r} does not exist")
            weights = {f"model.{n}": m.weight for n, m in iter_logical_modules(model.model) if isinstance(m, nn.Linear)}
            self.pool = AdapterPool(adapters_dir, weights, lora_slots, max_lora_rank,
                                    resolve_lora_dtype(lora_dtype, param.dtype), param.device)
            if param.device.type == "cpu" and param.dtype == torch.float32:  # the only case the kernel serves
                bgmv_kernel()  # built now (once per machine), not inside the first request's decode step
            for n in self.pool.modules:
                install_branch(model, n, SERVE_BRANCH, ServedLoraBranch(self.pool, n, self.ctx)).active = [SERVE_BRANCH]
                self._wrapped.append(n)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else (cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.scheduler = Scheduler(prefill_budget, self.kv.release)
        self._incoming: deque[Request] = deque()
        self._lock = threading.Lock()          # one step at a time
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)
        self.started = time.time()

    # --- requests ---
    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        """Token ids as ``deltatune generate`` makes them: a chat (list of messages) through the
        tokenizer's chat template without extra special tokens; plain text with them."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and not chat:
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
        elif chat or isinstance(prompt, list):
            self._check_text_length(sum(len(m["content"]) for m in prompt) if isinstance(prompt, list) else len(prompt))
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            self._check_text_length(len(prompt))
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty (no tokens)")
        return ids

    def _check_text_length(self, chars: int) -> None:
        """Refuse, before tokenizing it, a text that must have more than ``max_len`` tokens."""
        if chars > self.max_len * self.max_token_chars:
            raise RequestError(f"the prompt has {chars} characters, more than this engine's {self.max_len} tokens per request can hold")

    def submit(self, prompt, adapter: str | None = None, sampling: SamplingParams | None = None, on_event=None, chat: bool = False) -> Request:
        """Queue one request (thread-safe); bad input raises here, before anything is queued."""
        sampling = sampling or SamplingParams()
        ids = self.encode(prompt, chat)
        if len(ids) + sampling.max_tokens > self.max_len:
            raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {sampling.max_tokens} exceeds this engine's {self.max_len} tokens per request")
        if adapter is not None:
            if self.pool is None:
                raise AdapterNotFoundError(f"adapter {adapter!r}: the engine was started without an adapters directory")
            self.pool.path_of(adapter)
        req = Request(ids, sampling, adapter, on_event)
        req.generator = make_generator(sampling.seed)
        req.decoder = IncrementalDecoder(self.tokenizer)
        with self._wake:
            if self.queued() >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._incoming.append(req)
            self.stats["requests"] += 1
            self._wake.notify()
        return req

    def generate(self, prompts: list, adapters: list[str | None] | None = None, sampling: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False) -> list[Completion]:
        """Run ``prompts`` together (request i with ``adapters[i]``) and return their completions in order."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(adapters) != len(prompts) or len(samplings) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts, {len(adapters)} adapters and {len(samplings)} sampling settings; give one per prompt")
        reqs = [self.submit(p, a, s, chat=chat) for p, a, s in zip(prompts, adapters, samplings)]
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.done.is_set() for r in reqs):
                self.step()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [self.result(r) for r in reqs]

    def queued(self) -> int:
        """Requests submitted and not yet admitted to a KV slot."""
        return len(self.scheduler.waiting) + len(self._incoming)

    def result(self, r: Request) -> Completion:
        return Completion(r.text, list(r.output_ids), r.finish_reason, len(r.prompt_ids), r.adapter)

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (thread-safe): its KV slot and adapter reference are freed at the next step."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    # --- the loop ---
    def step(self) -> bool:
        """One scheduling step: admit, decode every running request once, prefill up to the budget, retire.
        Returns whether any model work was done."""
        with self._lock:
            with self._wake:
                while self._incoming:
                    self.scheduler.waiting.append(self._incoming.popleft())
            for r in self.scheduler.running:
                if r.cancelled:
                    r.finish_reason = "cancelled"
            for r in self.scheduler.retire():
                self._finish(r)
            self._fail_waiting(lambda r: r.cancelled, None)
            self._prepare_adapters()
            self.scheduler.admit(self.kv.allocate, self._adapter_ready)
            self._fail_waiting(lambda r: r.error is not None, None)
            worked = False
            decode = self.scheduler.decode_batch()
            if decode:
                tokens = self._forward(decode, [r.next_chunk(1) for r in decode], [True] * len(decode))
                self._accept(decode, tokens)
                worked = True
            prefill = self.scheduler.prefill_batch()
            if prefill:
                reqs = [r for r, _ in prefill]
                chunks = [c for _, c in prefill]
                last = [r.cached + len(c) == len(r.prompt_ids) for r, c in prefill]
                tokens = self._forward(reqs, chunks, last)
                self._accept([r for r, f in zip(reqs, last) if f], tokens)
                worked = True
            for r in self.scheduler.retire():
                self._finish(r)
            return worked

    def _prepare_adapters(self) -> None:
        """Start loading the adapters of the requests at the head of the queue — as many distinct
        ones as there are slots; loading for requests further back would evict these again."""
        if self.pool is None:
            return
        window: list[str] = []
        for r in self.scheduler.waiting:
            if r.adapter is not None and r.adapter not in window:
                window.append(r.adapter)
                if len(window) == self.pool.num_slots:
                    break
        failed = self.pool.poll(keep=set(window))
        if failed:
            self._fail_waiting(lambda r: r.adapter in failed, lambda r: failed[r.adapter])
        for name in window:
            try:
                self.pool.request(name)
            except DeltatuneError as err:
                for r in self.scheduler.waiting:
                    if r.adapter == name:
                        r.error = err

    def _adapter_ready(self, req: Request) -> int | None:
        if req.adapter is None:
            return -1
        if req.error is not None or req.adapter not in self.pool.resident:  # loads start only in _prepare_adapters
            return None
        return self.pool.acquire(req.adapter)

    def _fail_waiting(self, which, error_of) -> None:
        keep = deque()
        for r in self.scheduler.waiting:
            if which(r):
                if error_of is not None:
                    r.error = error_of(r)
                r.finish_reason = "cancelled" if r.cancelled else "error"
                self._finish(r)
            else:
                keep.append(r)
        self.scheduler.waiting = keep

    @torch.no_grad()
    def _forward(self, reqs: list[Request], chunks: list[list[int]], want: list[bool]) -> list[int]:
        """Run the rows' new tokens through the model; return the next token of each row in ``want``."""
        device = self.kv.k.device
        b, t = len(reqs), max(len(c) for c in chunks)
        tokens = torch.full((b, t), self.pad_id, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.tensor(c)
        tokens = tokens.to(device)
        start = torch.tensor([r.cached for r in reqs], device=device)
        n_new = torch.tensor([len(c) for c in chunks], device=device)
        positions = start[:, None] + torch.arange(t, device=device)[None, :]
        self.ctx.set([r.lora_slot for r in reqs], t, device, self.pool.covers_all if self.pool is not None else None)
        inner = self.model.model
        h = inner.embed_tokens(tokens)
        cos_sin = inner.rotary_emb(h, positions)
        cache = self.kv.step([r.kv_slot for r in reqs], start, n_new)
        mask = attention_mask(start, n_new, t, cache.kv_len, h.dtype)
        for layer in inner.layers[: self.model.config.num_hidden_layers]:
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions, **{self.cache_arg: cache})
        for r, c in zip(reqs, chunks):
            r.cached += len(c)
        rows = [i for i, w in enumerate(want) if w]
        if not rows:
            return []
        idx = torch.tensor(rows, device=device)
        last = h[idx, n_new[idx] - 1]                       # [rows, hidden]: only the positions we sample from
        logits = self.model.lm_head(inner.norm(last))
        picked = [reqs[i] for i in rows]
        return choose_tokens(logits, [r.sampling for r in picked], [r.generator for r in picked])

    def _accept(self, reqs: list[Request], tokens: list[int]) -> None:
        self.stats["generated_tokens"] += len(tokens)
        self._recent.append((time.time(), len(tokens)))
        for r, tok in zip(reqs, tokens):
            s = r.sampling
            if tok in self.eos_ids and not s.ignore_eos:
                r.text += r.decoder.flush(r.output_ids)
                r.finish_reason = "stop"
            else:
                r.output_ids.append(tok)
                searched = len(r.text)
                r.text += r.decoder.step(r.output_ids)
                if len(r.output_ids) >= s.max_tokens:
                    r.text += r.decoder.flush(r.output_ids)  # an incomplete last character shows as the full decode has it
                cut = stop_hit(r.text, s.stop, searched) if s.stop else None
                if cut is not None:
                    r.text, r.finish_reason = r.text[:cut], "stop"
                elif len(r.output_ids) >= s.max_tokens:
                    r.finish_reason = "length"
            if r.finish_reason is None:
                # Hold back a possible stop-string start (the decoder holds back incomplete characters).
                self._emit(r, len(r.text) - (held_back(r.text, s.stop) if s.stop else 0))

    def _emit(self, r: Request, upto: int) -> None:
        if upto > r.streamed and r.on_event is not None:
            r.on_event({"text": r.text[r.streamed: upto]})
        r.streamed = max(r.streamed, upto)

    def _finish(self, r: Request) -> None:
        if r.kv_slot is not None:
            self.kv.release(r.kv_slot)
            r.kv_slot = None
        if r.lora_slot >= 0 and self.pool is not None:
            self.pool.release(r.lora_slot)
        r.lora_slot = -1
        if r.error is None:
            self._emit(r, len(r.text))
            self.stats["cancelled" if r.finish_reason == "cancelled" else "finished"] += 1
            self.stats["prompt_tokens"] += len(r.prompt_ids)
        else:
            self.stats["errors"] += 1
        if r.on_event is not None:
            r.on_event({"finish_reason": r.finish_reason, "error": r.error})
        r.done.set()

    # --- background thread (the server) ---
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except Exception:  # a bug must fail the requests in flight, not hang their clients
                log.exception("engine step failed")
                with self._lock:
                    for r in self.scheduler.running:
                        r.error, r.finish_reason = EngineError("engine step failed"), "error"
                        self._finish(r)
                    self.scheduler.running = []
                worked = False
            if not worked:
                with self._wake:
                    if not self._incoming:
                        self._wake.wait(timeout=0.02)

    def close(self) -> None:
        """Stop the loop and take the serving wrappers off the model again."""
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for n in self._wrapped:
            remove_branch(self.model, n, SERVE_BRANCH)
        self._wrapped = []
        if self.pool is not None:
            self.pool.close()

    def metrics(self) -> dict:
        now = time.time()
        window = [n for ts, n in self._recent if now - ts <= 10.0]
        return {
            **self.stats,
            "queue_length": self.queued(),
            "running": len(self.scheduler.running),
            "kv_slots_free": self.kv.free_slots,
            "resident_adapters": len(self.pool.resident) if self.pool else 0,
            "adapter_loads": self.pool.loads if self.pool else 0,
            "adapter_evictions": self.pool.evictions if self.pool else 0,
            "tokens_per_second": sum(window) / 10.0,
            "uptime_seconds": now - self.started,
        }
