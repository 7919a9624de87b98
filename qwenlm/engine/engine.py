"""The inference engine: static KV cache written by index, precomputed rotary/LogN tables, decode
steps captured in CUDA graphs (one per KV-length bucket) and run-ahead decoding that syncs with
the host only every `sync_every` steps.

Same contract as the reference loop (`generation.generate.generate_steps`), and the same tokens:
rows are independent, so a row that has finished can keep computing (its extra tokens are
dropped) without changing the others. Tests hold the engine to the reference token for token.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import ContextLengthError
from ..generation.config import GenerationConfig
from ..generation.generate import StopChecker, collect, left_pad, make_generator, record_step
from ..generation.grammar import advance, hold
from ..generation.sampling import next_tokens
from ..models.layers import ForwardContext, attention_mask_4d, logn_scale, ntk_alpha
from .cache import KernelAttention, StaticKVCache, fused_rotary_on, kernel_attention_on

log = logging.getLogger("qwenlm")


def fuse_projections(model) -> None:
    """On a GPU the engines multiply each block's projections that share an input (gate/up, q/k/v) as
    one matmul (models/layers.py: FusedLinears). QWENLM_FUSE=0 keeps them separate; =1 fuses on any
    device."""
    mode = os.environ.get("QWENLM_FUSE", "")
    if mode == "1" or (mode != "0" and model.device.type == "cuda"):
        n = model.fuse_projections()
        log.info("engine: %d projection groups fused", n)
        if n and model.device.type == "cuda":
            # the separate weights' memory is free now but cached in pieces the size of one layer's
            # projection: give it back rather than keep it reserved beside the fused copies
            torch.cuda.empty_cache()


def gemv_projections(model) -> None:
    """QWENLM_GEMV=1: the engines' one-row products of float layers (batch-1 decoding) go through the
    Triton kernel (kernels/gemv.py) instead of cuBLAS, once it has passed its check on this device.
    Off by default until a GPU run shows it ahead (benchmarks/gpu_session.sh ab)."""
    if os.environ.get("QWENLM_GEMV") != "1":
        return
    from ..kernels import kernel_works

    if kernel_works("gemv", model.device, model.dtype):
        log.info("engine: %d layers multiply one row through the Triton kernel", model.use_gemv())


@dataclass
class GenerationStats:
    """What the last generation read and wrote, and how long it took (`Engine.last_stats`)."""

    prompt_tokens: int  # of all rows
    reused_tokens: int  # of those, the ones whose keys/values came from the kept cache (not read again)
    new_tokens: int  # generated, of all rows (a row's end token included)
    prompt_seconds: float  # from the call to the first new token
    decode_seconds: float  # from the first new token to the last

    @property
    def tokens_per_second(self) -> float | None:
        """The decoding rate: the tokens after the first ones, over the time after them."""
        n = self.new_tokens - (1 if self.new_tokens else 0)
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else None

    def summary(self) -> str:
        """`42 tokens, 45.3 tokens/s; prompt 214 tokens (190 reused) in 0.21 s`"""
        rate = self.tokens_per_second
        out = f"{self.new_tokens} token{'' if self.new_tokens == 1 else 's'}"
        out += f", {rate:.1f} tokens/s" if rate is not None else ""
        reused = f" ({self.reused_tokens} reused)" if self.reused_tokens else ""
        return out + f"; prompt {self.prompt_tokens} tokens{reused} in {self.prompt_seconds:.2f} s"


def prompt_alpha(model, n: int) -> float:
    """The dynamic-NTK alpha of an n-token prompt (Qwen v1 past `seq_length`): chosen at prefill and
    frozen afterwards; keys are rotated with it, so cached keys serve only prompts of the same alpha."""
    c = model.config
    if model.use_dynamic_ntk and not model.training and n > c.seq_length:
        return float(ntk_alpha(n, c.seq_length))
    return 1.0


def common_prefix(prompt: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens `prompt` shares with `tokens` (whose keys/values a cache holds), at most
    all but its last (whose logits are needed)."""
    n, limit = 0, min(len(prompt) - 1, len(tokens))
    while n < limit and prompt[n] == tokens[n]:
        n += 1
    return n


class Engine:
    """Fast generation for one model. `generate_steps(prompts, cfg)` yields each step's tokens."""

    PREFILL_CHUNK = 512

    def __init__(self, model, cuda_graphs: bool | None = None, bucket: int = 256,
                 keep_state: bool | None = None, prefill_chunk: int | None = None, reuse_prefix: bool = False):
        self.model = model
        self.cfg = model.config
        self.device = model.device
        self.bucket = bucket
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        # keeping the cache between generations only pays when captured graphs can be replayed
        self.keep_state = self.cuda_graphs if keep_state is None else keep_state
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._warm_stream = None
        self._state: dict | None = None
        self._packs = None  # fused CPU decode blocks (4-bit models), built on first decode
        # a long unpadded prompt is read in chunks of this many tokens on a CPU (where it takes seconds
        # per chunk), reporting each to `on_prefill(done, total)`; on a GPU in one pass
        self.prefill_chunk = prefill_chunk or (self.PREFILL_CHUNK if self.device.type == "cpu" else None)
        self.on_prefill: Callable[[int, int], None] | None = None
        # `reuse_prefix`: after a one-prompt generation keep its cache, and read only what is new of a
        # next prompt that starts with the same tokens (a chat's next turn: the whole conversation so
        # far is the prefix). `_kept`: the tokens whose keys/values fill the kept cache's first slots.
        self.reuse_prefix = reuse_prefix
        self._kept: dict | None = None
        self.last_stats: GenerationStats | None = None
        fuse_projections(model)
        gemv_projections(model)
        log.info("engine: %s, cuda graphs %s", self.device, "on" if self.cuda_graphs else "off")

    # ---- tables ---------------------------------------------------------------------------
    def _rotary_tables(self, alphas: list[float], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, S, D) fp32 cos/sin; A = 1 when every row shares one NTK alpha, else one per row."""
        d, dev = self.cfg.head_dim, self.device
        exponent = torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d
        pos = torch.arange(max_len, dtype=torch.float32, device=dev)
        uniq = sorted(set(alphas))
        rows = [alphas[0]] if len(uniq) == 1 else alphas
        cos, sin = [], []
        for a in rows:
            base = self.cfg.rope_theta * (float(a) ** (d / (d - 2)) if a != 1 else 1.0)
            inv = 1.0 / base ** exponent
            emb = torch.outer(pos, inv)
            emb = torch.cat((emb, emb), dim=-1)
            cos.append(emb.cos())
            sin.append(emb.sin())
        return torch.stack(cos), torch.stack(sin)

    # ---- one generation -------------------------------------------------------------------
    def _setup(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, max_len: int, keep: int = 0) -> dict:
        """Buffers of one generation. `keep`: slots [0, keep) of the kept cache hold the prompt's first
        tokens (see `_reusable`): the cache is used again, or copied into a larger one."""
        m, c, dev = self.model, self.cfg, self.device
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        ids, mask = left_pad(prompts, pad, dev)
        b, w = ids.shape
        lengths = [len(p) for p in prompts]
        alphas = [prompt_alpha(m, n) for n in lengths]
        int8 = m.kv_int8
        prev = self._state["cache"] if self._state is not None else None
        shape = (len(m.blocks), b, c.num_kv_heads, max_len, c.head_dim)
        if keep and prev.shape[3] >= max_len:
            cache, max_len = prev, prev.shape[3]
        elif prev is not None and prev.shape == shape and prev.dtype == m.dtype and prev.int8 == int8:
            cache = prev  # stale slots are masked out by `valid`
        else:
            if not keep:
                self.release()  # free the old cache before allocating the new one
            cache = StaticKVCache(*shape, m.dtype, dev, int8=int8)
            if keep:
                cache.copy_prefix(prev, keep)
                self.release()
        cos_t, sin_t = self._rotary_tables(alphas, max_len)
        logn_t = None
        if m.use_logn_attn and max(lengths) + cfg.max_new_tokens > c.seq_length:
            logn_t = logn_scale(torch.arange(max_len, device=dev)[None], c.seq_length)[0]
        valid = torch.zeros((b, max_len), dtype=torch.bool, device=dev)
        valid[:, :w] = mask.bool()
        self.last_kv_bytes, self.last_max_len = cache.nbytes, max_len
        return {"ids": ids, "mask": mask, "b": b, "w": w, "cos": cos_t, "sin": sin_t, "logn": logn_t,
                "alpha": alphas[0], "keep": keep, "filled": keep,
                "valid": valid, "cache": cache, "table_rows": torch.arange(cos_t.shape[0], device=dev)[:, None]
                if cos_t.shape[0] > 1 else torch.zeros((b, 1), dtype=torch.long, device=dev),
                "tok": torch.zeros((b, 1), dtype=torch.long, device=dev),
                "slot": torch.zeros((1,), dtype=torch.long, device=dev),
                "pos": (torch.tensor(lengths, device=dev) - 1)[:, None].clone(),
                "start": (w - torch.tensor(lengths, device=dev)).to(torch.int32),  # left padding
                # decode attention through the Triton kernel (GPU), decided once per generation
                "kernel_attention": kernel_attention_on(dev, m.dtype, int8, c.head_dim),
                "fused_rotary": fused_rotary_on(dev, m.dtype, int8, c.head_dim)}

    _GRAPH_INPUTS = ("valid", "cos", "sin", "logn", "table_rows", "tok", "slot", "pos", "start")

    def _adopt(self, st: dict) -> dict:
        """Reuse the previous generation's buffers (and so its captured graphs) when the shapes
        match, copying the new values in place; otherwise start over with fresh graphs."""
        old = self._state
        if old is not None and all(
                (old[k] is None and st[k] is None) or (old[k] is not None and st[k] is not None
                                                       and old[k].shape == st[k].shape)
                for k in self._GRAPH_INPUTS) and old["cache"] is st["cache"]:
            for k in self._GRAPH_INPUTS:
                if st[k] is not None:
                    old[k].copy_(st[k])
            for k in ("ids", "mask", "b", "w", "alpha", "keep", "filled"):
                old[k] = st[k]
            return old
        self.release()
        self._state = st
        return st

    def release(self) -> None:
        """Free the KV cache, buffers and captured graphs (they are rebuilt on the next call)."""
        self._graphs.clear()
        self._pool = None  # a pool must not outlive the graphs that used it
        self._state = None
        self._kept = None

    def _reusable(self, prompts: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of a one-prompt generation the kept cache already holds (at most
        all but the last: its logits are needed). 0 when another setting changed what the cache
        would hold: the cache format, or the NTK alpha (keys are rotated with it)."""
        kept = self._kept
        if kept is None or self._state is None or len(prompts) != 1:
            return 0
        m, p = self.model, prompts[0]
        if (kept["int8"], kept["dtype"], kept["alpha"], kept["weights"]) != (
                m.kv_int8, m.dtype, prompt_alpha(m, len(p)), self._weights_stamp()):
            return 0
        return common_prefix(p, kept["tokens"])

    def _remember(self, prompts, st: dict, sampled: torch.Tensor) -> None:
        """After a one-prompt generation (finished, stopped early or interrupted): which tokens fill
        the cache's first st['filled'] slots."""
        if not self.reuse_prefix or len(prompts) != 1 or st["filled"] == 0:
            self._kept = None
            return
        w, filled = st["w"], st["filled"]
        tokens = list(prompts[0]) + sampled[0, :max(0, filled - w)].tolist()
        self._kept = {"tokens": tokens[:filled], "alpha": st["alpha"], "int8": self.model.kv_int8,
                      "dtype": self.model.dtype, "weights": self._weights_stamp()}

    def _weights_stamp(self) -> tuple[int, int, int]:
        """Changes when the model's parameters do: replaced (their number and identities) or updated
        in place (their version counters: an optimizer step, load_state_dict). Kept keys/values
        computed with other weights must not serve. (Inference-mode tensors, such as quantized
        blocks, have no counter; they are not trained.)"""
        n = ids = versions = 0
        for p in self.model.parameters():
            n, ids = n + 1, ids + id(p)
            try:
                versions += p._version
            except RuntimeError:
                pass
        return n, ids, versions

    def _ctx(self, st: dict, positions: torch.Tensor, mask, cache_read: int | None) -> ForwardContext:
        rows = st["table_rows"]
        cos, sin = st["cos"][rows, positions], st["sin"][rows, positions]  # (B, T, D)
        logn = st["logn"][positions] if st["logn"] is not None else None
        st["cache"].read_len = cache_read
        return ForwardContext(cos=cos, sin=sin, logn=logn, mask=mask, cache=st["cache"])

    @torch.inference_mode()
    def _prefill(self, st: dict) -> torch.Tensor:
        ids, mask, w = st["ids"], st["mask"], st["w"]
        padded = not bool(mask.all())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        chunk = self.prefill_chunk
        if st["keep"]:  # the first st["keep"] tokens are in the cache already: read the rest
            return self._chunked_prefill(st, positions, chunk or w, st["keep"])
        if chunk and not padded and w > chunk:
            return self._chunked_prefill(st, positions, chunk)
        st["cache"].write_pos = torch.arange(w, device=self.device)
        st["cache"].chunk_mask = mask if padded else None
        amask = attention_mask_4d(mask, w) if padded else None
        h = self.model.run_blocks(ids, self._ctx(st, positions, amask, None))
        st["filled"] = w
        return self.model.lm_head(h[:, -1]).float()  # only the last position's logits

    def _chunked_prefill(self, st: dict, positions: torch.Tensor, chunk: int, start: int = 0) -> torch.Tensor:
        """Read an unpadded prompt from token `start` on, `chunk` tokens at a time: each chunk writes its
        slots and attends to every slot before it (a first chunk to itself alone, like a one-pass
        prefill). Progress, `on_prefill(done, total)`, counts the tokens read here."""
        ids, mask, w, cache = st["ids"], st["mask"], st["w"], st["cache"]
        cache.chunk_mask = None
        for s in range(start, w, chunk):
            e = min(w, s + chunk)
            cache.write_pos = torch.arange(s, e, device=self.device)
            amask = attention_mask_4d(mask[:, :e], e - s) if s else None
            h = self.model.run_blocks(ids[:, s:e], self._ctx(st, positions[:, s:e], amask, e if s else None))
            st["filled"] = e
            if self.on_prefill is not None:
                self.on_prefill(e - start, w - start)
        return self.model.lm_head(h[:, -1]).float()

    def _decode(self, st: dict, length: int) -> torch.Tensor:
        """One decode step over KV slots [0, length): token st['tok'] goes to slot st['slot']."""
        st["valid"].index_fill_(1, st["slot"], True)
        if self._packs is None:
            from ..quant.q4 import pack_blocks

            self._packs = pack_blocks(self.model) or []
        if self._packs:
            return self._fused_decode(st, length)
        cache = st["cache"]
        cache.write_pos = st["slot"]
        if st["kernel_attention"]:  # Triton: reads slots [start, slot] (and 8-bit codes) directly
            ctx = self._ctx(st, st["pos"], None, None)
            ctx.decode = KernelAttention(cache, lambda i, k, v: cache.store(i, k, v, cache.put_at_write_pos),
                                         st["start"], (st["slot"] + 1).expand(st["b"]), length,
                                         slots=st["slot"].expand(st["b"]) if st["fused_rotary"] else None)
        else:
            kpos = torch.arange(length, device=self.device)
            mask = (st["valid"][:, :length] & (kpos <= st["slot"]))[:, None, None, :]  # (B, 1, 1, L)
            ctx = self._ctx(st, st["pos"], mask, length)
        h = self.model.run_blocks(st["tok"], ctx)
        return self.model.lm_head(h[:, -1]).float()

    def _fused_decode(self, st: dict, length: int) -> torch.Tensor:
        """The same step with each block in one call of the 4-bit CPU kernel (quant/csrc)."""
        from ..quant.q4 import fused_decode

        rows, pos = st["table_rows"][:, 0], st["pos"][:, 0]
        logn = st["logn"][pos] if st["logn"] is not None else None
        h = fused_decode(self.model, self._packs, st["tok"][:, 0], st["cos"][rows, pos], st["sin"][rows, pos], logn,
                         st["cache"], st["slot"].expand(st["b"]), st["valid"], length)
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def _decode_step(self, st: dict, length: int) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._decode(st, length)
        key = length
        if key not in self._graphs:
            # warm up on a side stream (idempotent: same inputs, same cache writes), then capture.
            # One stream for every warm-up: each new stream would get its own cuBLAS workspace, kept for
            # the life of the process (one per 256-slot bucket adds up to about a GiB on a 7B run)
            s = self._warm_stream = self._warm_stream or torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._decode(st, length)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._decode(st, length)
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    @torch.inference_mode()
    def generate_steps(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                       stop: StopChecker | None = None, vocab_limit: int | None = None,
                       sync_every: int = 1, constraints: list | None = None) -> Iterator[list[int | None]]:
        """Yield each row's new token per step (None once finished), like the reference loop.
        With `sync_every > 1` the GPU runs ahead and the host checks stops every that many steps.
        `constraints`: each row's grammar (generation/grammar.py; None: free), told every token."""
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        try:
            yield from self._steps(prompts, cfg, stop, vocab_limit, sync_every, constraints)
        finally:
            if not self.keep_state and self._kept is None:
                self.release()  # free the KV cache as soon as the generation ends

    def _steps(self, prompts, cfg, stop, vocab_limit, sync_every, constraints=None):
        started = time.perf_counter()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        stop = stop or StopChecker(cfg)
        w = max(len(p) for p in prompts)
        limit = self.model.context_window
        if w >= limit:
            raise ContextLengthError(w, limit)
        n_new = min(cfg.max_new_tokens, limit - w)  # a reply stops where the context ends
        max_len = self.bucket * math.ceil((w + n_new) / self.bucket)
        keep = self._reusable(prompts) if self.reuse_prefix else 0
        self._kept = None  # (the cache is about to change)
        st = self._adopt(self._setup(prompts, cfg, max_len, keep))
        b, dev = st["b"], self.device
        seen = torch.zeros((b, self.cfg.vocab_size), dtype=torch.bool, device=dev)
        if cfg.repetition_penalty != 1.0:
            seen.scatter_(1, st["ids"], st["mask"].bool())
        generator = make_generator(cfg.seed, dev)
        out_tokens = torch.zeros((b, max(n_new, 1)), dtype=torch.long, device=dev)
        generated: list[list[int]] = [[] for _ in range(b)]
        finished = [False] * b
        first = None
        try:
            for step in self._token_loop(st, cfg, stop, vocab_limit, sync_every, n_new, seen, generator, out_tokens,
                                         generated, finished, constraints):
                if first is None:
                    first = time.perf_counter()
                yield step
        finally:
            self._remember(prompts, st, out_tokens)
            end = time.perf_counter()
            first = first or end
            self.last_stats = GenerationStats(sum(len(p) for p in prompts), keep, sum(len(g) for g in generated),
                                              first - started, end - first)

    def _token_loop(self, st, cfg, stop, vocab_limit, sync_every, n_new, seen, generator, out_tokens, generated,
                    finished, constraints=None):
        b, w, dev, vocab = st["b"], st["w"], self.device, self.cfg.vocab_size
        max_len = st["valid"].shape[1]
        rows = torch.arange(b, device=dev)
        logits = self._prefill(st) if n_new else None
        done_steps = 0
        for step in range(n_new):
            if vocab_limit is not None and vocab_limit < vocab:
                logits[:, vocab_limit:] = float("-inf")
            if constraints is not None:
                hold(logits, constraints)
            tok = next_tokens(logits, seen, cfg, generator)
            if constraints is not None:
                advance(constraints, tok.tolist())
            out_tokens[:, step] = tok
            last = step == n_new - 1
            if (step + 1) % sync_every == 0 or last:
                for row_step in out_tokens[:, done_steps:step + 1].T.tolist():
                    yield record_step(row_step, generated, finished, stop)
                    if all(finished):
                        return
                done_steps = step + 1
            if last:
                break
            seen[rows, tok] = True
            st["tok"].copy_(tok[:, None])
            st["pos"].add_(1)
            slot = w + step
            st["slot"].fill_(slot)
            # graphs need a few fixed lengths; without them attend to exactly the filled slots
            length = min(self.bucket * math.ceil((slot + 1) / self.bucket), max_len) if self.cuda_graphs else slot + 1
            logits = self._decode_step(st, length)
            st["filled"] = slot + 1

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                 stop: StopChecker | None = None, vocab_limit: int | None = None,
                 sync_every: int | None = None, constraints: list | None = None) -> list[list[int]]:
        """New token ids of each row. On CUDA the GPU runs 16 steps ahead of the stop checks;
        on CPU every step is checked (a wasted step there costs real time)."""
        if sync_every is None:
            sync_every = 16 if self.device.type == "cuda" else 1
        return collect(self.generate_steps(prompts, cfg, stop, vocab_limit, sync_every, constraints), len(prompts))


def get_engine(model) -> Engine:
    """The model's engine, created on first use."""
    eng = getattr(model, "_qwenlm_engine", None)
    if eng is None or eng.device != model.device:
        # on a CPU, where reading a prompt takes seconds, a chat's next turn reads only its new tokens
        eng = Engine(model, reuse_prefix=model.device.type == "cpu")
        object.__setattr__(model, "_qwenlm_engine", eng)
    return eng
