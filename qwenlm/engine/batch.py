"""Continuous batching: one engine loop serves many sequences; each joins the running batch when a
slot is free and leaves it the step it finishes (or is aborted), without waiting for the others.

Memory is managed in slots: the KV cache holds `max_num_seqs` rows of `max_model_len` positions,
allocated once, in the model's dtype or in 8 bits (`model.kv_cache == "int8"`, see cache.py).
Running sequences always occupy rows [0, n): when one leaves, the last row's
filled positions move into its place, so a decode step works on one contiguous block of rows.
Submitting to a full queue raises `QueueFull` (the server answers 429).

Sequences that arrive together are prefilled in one forward pass (right-padded; on GPU, or with
`batch_prefill=True`), otherwise one by one, then decoded together with the others; a row's arithmetic
does not depend on the other rows on the fused 4-bit CPU path (per-row kernels, prompts prefilled
alone), so a greedy request gives the same tokens alone or in a crowd there. Each sequence has its own
sampling settings, random generator, stop rules and token budget.

On a CPU, reading prompts is interleaved with decoding: a step reads at most `prefill_chunk` prompt
tokens, so a long prompt delays the running streams by one chunk per token instead of its whole length.

On a GPU the decode steps run one ahead (`pipeline`): while the device computes step N+1, whose input
tokens it chose itself at step N, the host hands out step N's tokens, checks the stop rules and
finishes sequences. A sequence that stops at step N has taken part in step N+1 for nothing (that
step's token for it is dropped; a sequence that runs out of budget or context at N is a padding row
in it). The engine runs ahead only between steps that change nothing but the running rows' tokens:
new requests, aborts and prompts to read wait for the step in flight first, and so do rows that
need their tokens on the host before the next step (grammars, OpenAI penalties, logprobs, logit bias,
a dynamic-NTK alpha).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation.config import GenerationConfig
from ..generation.generate import StopChecker, make_generator
from ..models.layers import ForwardContext, attention_mask_4d, logn_scale, rotary_cos_sin
from .cache import ExtendWriter, KernelAttention, KVStore, RowWriter, StepWriter, fused_rotary_on, kernel_attention_on
from .engine import common_prefix, fuse_projections, gemv_projections, prompt_alpha
from .sampler import RowSampler

log = logging.getLogger("qwenlm")


class QueueFull(Exception):
    """The waiting queue is at its limit; retry later."""


class BadToken(ValueError):
    """A prompt holds a token id that the model has no embedding for."""


@dataclass(eq=False)
class Sequence:
    """One generation. `emit(token, finish_reason)` is called from the engine thread for every new
    token (finish_reason None while it goes on) and once more with token None if it ends without a
    token of its own (abort, error). Compared by identity (two requests may be alike field by field)."""

    prompt: list[int]
    cfg: GenerationConfig
    stop: StopChecker
    emit: Callable[[int | None, str | None], None]
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    aborted: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    # engine state
    row: int = -1
    cached: int = 0  # KV positions filled (by the steps whose tokens have been handed out)
    inflight: int = 0  # decode steps run for it whose tokens are not handed out yet (BatchEngine.pipeline)
    alpha: float = 1.0
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)
    reused: int = 0  # prompt tokens whose keys/values came from the prefix cache
    # log-probabilities (OpenAI's logprobs): None = not asked; k = each token's and the k likeliest.
    # Entries are (logprob of the token, [(token id, logprob)] * k), from the model's own distribution
    # (before penalties, bias and temperature), appended before the token is emitted.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for prompt tokens 1.. (echo); such a prompt is read whole
    token_logprobs: list = field(default_factory=list)
    prompt_token_logprobs: list = field(default_factory=list)
    # structured output (generation/grammar.py Constraint): which tokens may come next, told each new one
    constraint: object | None = None

    @property
    def plain_greedy(self) -> bool:
        c = self.cfg
        return c.greedy and c.repetition_penalty == 1.0 and c.presence_penalty == 0 and c.frequency_penalty == 0


class BatchEngine:
    """`submit(seq)` from any thread; `start()` runs the loop in a daemon thread."""

    PREFILL_CHUNK = 256  # prompt tokens per step on a CPU (see __init__)

    def __init__(self, model, max_num_seqs: int = 8, max_model_len: int = 4096, max_queue: int = 256,
                 vocab_limit: int | None = None, cuda_graphs: bool | None = None, fixed_shapes: bool | None = None,
                 bucket: int = 256, batch_prefill: bool | None = None, max_prefill_tokens: int = 8192,
                 prefill_chunk: int | None = None, prefix_cache: bool | None = None, pipeline: bool | None = None):
        if max_num_seqs < 1 or max_model_len < 2:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 2")
        self.model, self.cfg = model, model.config
        self.device = model.device
        self.max_num_seqs, self.max_model_len, self.max_queue = max_num_seqs, max_model_len, max_queue
        c = self.cfg
        self.kv = KVStore(len(model.blocks), max_num_seqs, c.num_kv_heads, max_model_len, c.head_dim, model.dtype,
                          self.device, int8=model.kv_int8)
        self.kv_bytes = self.kv.nbytes
        from ..quant.q4 import pack_blocks

        fuse_projections(model)
        gemv_projections(model)
        self._packs = pack_blocks(model) if self.device.type == "cpu" else None
        self._kernel_attention = not self._packs and kernel_attention_on(self.device, model.dtype, self.kv.int8,
                                                                         c.head_dim)
        self._fused_rotary = self._kernel_attention and fused_rotary_on(self.device, model.dtype, self.kv.int8,
                                                                        c.head_dim)
        # Per-op decode steps run at fixed shapes: rows padded to a power of two, slots to a multiple of
        # `bucket`. On CUDA each shape is captured once in a graph and replayed (no launch overhead);
        # `fixed_shapes=True` alone keeps the shapes without capturing (what the CPU tests exercise).
        self.cuda_graphs = not self._packs and ((self.device.type == "cuda") if cuda_graphs is None else cuda_graphs)
        self.static_shapes = self.cuda_graphs or (not self._packs and bool(fixed_shapes))
        self.bucket = bucket
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self._warm_stream = None
        self._buf: dict[str, torch.Tensor] | None = None
        self.sampler = RowSampler(max_num_seqs, self.device, vocab_limit)
        # Decode steps run one ahead (see the module's doc): on CUDA by default. On a CPU the host is
        # what computes the step, so nothing overlaps there. QWENLM_PIPELINE=0 or 1 sets the default.
        if pipeline is None:
            env = os.environ.get("QWENLM_PIPELINE", "")
            pipeline = env == "1" or (self.device.type == "cuda" and env != "0")
        self.pipeline = bool(pipeline) and not self._packs
        self._ahead: dict | None = None  # the step in flight: its rows, which of them are live, tokens
        # Prompts arriving together are prefilled in one forward pass (right-padded, up to
        # `max_prefill_tokens` padded tokens) on GPU; one at a time on the fused CPU path, whose per-row
        # kernels then give a request the same numbers alone or in a crowd.
        self.batch_prefill = (self.device.type == "cuda") if batch_prefill is None else batch_prefill
        self.batch_prefill = self.batch_prefill and not self._packs
        self.max_prefill_tokens = max_prefill_tokens
        # On a CPU a prompt takes seconds to read, and every running stream would wait for it: there each
        # step reads at most `prefill_chunk` prompt tokens (whole short prompts, or one chunk of a long
        # one, in turns) before its decode step. A long prompt is read in the top row, one at a time, then
        # moves next to the running rows. Chunks start at fixed positions, so a request's numbers do not
        # depend on the crowd. 0: read every admitted prompt whole before the next decode step.
        if prefill_chunk is None:
            prefill_chunk = self.PREFILL_CHUNK if self.device.type == "cpu" else 0
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0")
        self.prefill_chunk = prefill_chunk
        self._long_turn = False
        # Prefix cache: a finished sequence's row keeps its keys/values while no one needs the row
        # ("parked", with the tokens its slots hold), and a new prompt that starts with at least
        # `prefix_min` of those tokens (a conversation's next turn) takes the row and reads only the
        # rest (on GPU the rests of a step's prompts in one forward pass, as new prompts are).
        self.prefix_cache = True if prefix_cache is None else prefix_cache
        self.prefix_min = 32
        self._parked: dict[int, dict] = {}  # row -> {"tokens": [...], "alpha": NTK alpha}
        # Running sequences lend their keys/values too (a copy): a prompt that starts like one of theirs
        # (the same long system prompt or tool list, the n choices of one request) reads only the rest.
        # Such prompts arriving together: the first is read, the others are held for a step and copy it.
        self._held: list[Sequence] = []
        self.active: list[Sequence] = []
        # admitted (a slot is theirs) but their prompt not fully read; the first long one is being read
        self.admitted: collections.deque[Sequence] = collections.deque()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = collections.Counter()  # steps, prompt_tokens, generation_tokens, finished_<reason>

    # ---- public ---------------------------------------------------------------------------
    @staticmethod
    def kv_bytes_per_token(model) -> int:
        c = model.config
        return KVStore.bytes_per_token(len(model.blocks), c.num_kv_heads, c.head_dim, model.dtype,
                                       model.kv_int8)

    def warm_up(self) -> float:
        """Run each padded row count (1, 2, 4, ... up to max_num_seqs) once through a prompt read and a
        decode step, so that the one-off work of a new shape is done before the first request instead
        of stalling every stream of the first crowd: torch.compile's variants for one row and for
        several, a CUDA graph per row count at the first slot bucket, Triton's specializations (on the
        H100, 3.5-5 s of first-token wait at the first 8- and 32-stream batches). Leaves no trace: no
        parked rows, the counters as they were (but `graphs`). Call before `start`. Returns seconds.
        Decode steps run ahead (`pipeline`) here too, twice per row count: if that fails on this
        device, the engine says so in the log and runs its steps one after the other."""
        if self._thread is not None or not self.idle:
            raise RuntimeError("warm_up needs an idle engine that is not running its loop yet")
        t0 = time.perf_counter()
        before = self.stats.copy()
        try:
            self._warm_up()
        except Exception as e:
            if not self.pipeline:
                raise
            log.warning("decode steps cannot run ahead on this device (%s: %s); they run one after the other",
                        type(e).__name__, e)
            self.pipeline = False
            self.waiting.clear()
            self._forget_rows()
            self._warm_up()
        graphs = self.stats["graphs"]
        self.stats = before
        if graphs:
            self.stats["graphs"] = graphs
        return time.perf_counter() - t0

    def _warm_up(self) -> None:
        vocab = self.cfg.vocab_size
        cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=3, eos_token_id=None,
                               pad_token_id=0)
        counts = sorted({min(1 << i, self.max_num_seqs) for i in range(self.max_num_seqs.bit_length() + 1)})
        for n in counts:
            # distinct 2-token prompts: read together (several rows, several positions), none shared
            for i in range(min(n, self.max_queue)):
                self.submit(Sequence(prompt=[(i + 2) % vocab, 1], cfg=cfg, stop=StopChecker(cfg),
                                     emit=lambda t, r: None))
            with torch.inference_mode():
                while not self.idle:
                    self.step(self.take_waiting())
            self._parked.clear()

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwenlm-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def thread(self) -> threading.Thread | None:
        """The engine loop's thread (None until `start`)."""
        return self._thread

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise ValueError("the prompt is empty")
        if len(seq.prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(seq.prompt)} tokens; this server's context is "
                             f"{self.max_model_len} tokens (prompt plus completion)")
        vocab = self.cfg.vocab_size
        if not all(0 <= t < vocab for t in seq.prompt):  # (it would fail the whole step, every row with it)
            bad = next(t for t in seq.prompt if not 0 <= t < vocab)
            raise BadToken(f"token id {bad} is outside this model's vocabulary (0..{vocab - 1})")
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self._cv.notify()

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (client gone): it leaves the batch at the next step and frees its row."""
        with self._cv:
            seq.aborted = True
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        """Sequences holding a slot: decoding, or having their prompt read."""
        return len(self.active) + len(self.admitted)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.active or self.admitted)

    @property
    def _reading(self) -> Sequence | None:
        """The admitted sequence whose prompt is being read in the top row (it has slots filled)."""
        return next((s for s in self.admitted if s.cached), None)

    def take_waiting(self) -> list[Sequence]:
        """Pop the waiting sequences that free slots can admit (call with the lock held, or from the
        only thread that touches the engine)."""
        new = []
        while self.waiting and self.running + len(new) < self.max_num_seqs:
            new.append(self.waiting.popleft())
        return new

    def _forget_rows(self) -> None:
        """After a failed step: no row holds anything (running, being read, parked, in flight)."""
        self.active, self._held, self._ahead = [], [], None
        self.admitted.clear()
        self._parked.clear()

    # ---- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and self.idle:
                    self._cv.wait()
                if self._stopping:
                    break
                new = self.take_waiting()
            try:
                with torch.inference_mode():
                    self.step(new)
            except Exception:  # a bug: fail the running requests, keep serving
                log.exception("engine step failed")
                for seq in self.active + list(self.admitted) + [s for s in new if s not in self.admitted]:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.emit(None, "error")
                self._forget_rows()
        for seq in list(self.active) + list(self.admitted) + list(self.waiting):
            seq.finish_reason = "abort"
            seq.emit(None, "abort")

    def step(self, new: list[Sequence] = ()) -> None:
        """Drop aborted sequences, admit the new ones, read prompts (all of them, or up to
        `prefill_chunk` tokens), then one decode step for the running ones."""
        if self._ahead is not None and (new or self.admitted or any(s.aborted for s in self.active)):
            self._land()  # (the rows change: the step in flight hands out its tokens first)
        for seq in [s for s in self.active if s.aborted]:
            self._finish(seq, "abort", emit_none=True)
        self.admitted.extend(new)
        for seq in [s for s in self.admitted if s.aborted]:
            self.admitted.remove(seq)
            if seq.cached:  # it held the top row
                self.stats["finished_abort"] += 1
            seq.finish_reason = "abort"
            seq.emit(None, "abort")
        candidates = [s for s in self._held if s in self.admitted and not s.cached] + list(new)
        claimed: list[Sequence] = []  # (joined, their rests not read yet: they lend nothing in this loop)
        for seq in candidates:
            if self.prefix_cache and (self._parked or self.active) and not seq.aborted and self._claim(seq, claimed):
                claimed.append(seq)
        self._read_rests(claimed)
        self._held = self._twins() if self.prefix_cache else []
        whole, long = self._plan()
        group: list[Sequence] = []
        for seq in whole:
            width = max([len(seq.prompt)] + [len(s.prompt) for s in group])
            if group and (not self.batch_prefill or width * (len(group) + 1) > self.max_prefill_tokens):
                self._prefill(group)
                group = []
            group.append(seq)
        if group:
            self._prefill(group)
        if long is not None:
            self._read_chunk(long)
        if self.active:
            self._decode()

    def _plan(self) -> tuple[list[Sequence], Sequence | None]:
        """This step's prompt reading: (prompts read whole, taken out of `admitted`; the long prompt
        that gets its next chunk, or None)."""
        chunk = self.prefill_chunk
        held = self._held
        if not chunk:
            whole = [s for s in self.admitted if s not in held]
            for seq in whole:
                self.admitted.remove(seq)
            return whole, None
        long = self._reading or next((s for s in self.admitted if len(s.prompt) > chunk and s not in held), None)
        short = [s for s in self.admitted if len(s.prompt) <= chunk and not s.cached and s not in held]
        if long is not None and (self._long_turn or not short):
            self._long_turn = False
            return [], long
        self._long_turn = True
        whole, budget = [], chunk
        for seq in short:
            if len(seq.prompt) > budget:
                break
            whole.append(seq)
            budget -= len(seq.prompt)
        for seq in whole:
            self.admitted.remove(seq)
        return whole, None

    # ---- model calls ----------------------------------------------------------------------
    def _join(self, seq: Sequence) -> None:
        """`seq` (its prompt read into row len(active)) joins the running rows."""
        c, dev = self.cfg, self.device
        seq.row = len(self.active)
        self._vacate(seq.row)
        self.active.append(seq)
        seq.cached = len(seq.prompt)
        seq.generator = make_generator(seq.cfg.seed, dev)
        if seq.cfg.repetition_penalty != 1.0:
            self.sampler.see_prompt(seq.row, seq.prompt, c.vocab_size)
        self.stats["prompt_tokens"] += len(seq.prompt)

    def _set_alpha(self, seq: Sequence) -> None:
        """Dynamic NTK: the prompt's rotary base, from its whole length (as one pass would)."""
        seq.alpha = prompt_alpha(self.model, len(seq.prompt))

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill new sequences into the next free rows, together (right-padded) when several."""
        m, dev = self.model, self.device
        first_row = len(self.active)
        lengths = [len(s.prompt) for s in seqs]
        for seq in seqs:
            self._set_alpha(seq)
            self._join(seq)
        t = max(lengths)
        ids = torch.tensor([s.prompt + [0] * (t - len(s.prompt)) for s in seqs], device=dev)
        # right padding: a real token's causal window never reaches the pads, so plain causal
        # attention (the flash kernels) serves; `valid` keeps the pads out of the int8 key centers
        valid = None
        if min(lengths) < t:
            valid = torch.arange(t, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]
        pos = torch.arange(t, device=dev)[None].expand(len(seqs), t)
        ctx = self._context(pos, [s.alpha for s in seqs], mask=None, last=t - 1)
        ctx.cache = RowWriter(self.kv, first_row, valid)
        h = m.run_blocks(ids, ctx)
        for b, seq in enumerate(seqs):
            if seq.prompt_logprobs is not None:
                self._prompt_logprobs(seq, h[b], 0)
        self._first_tokens(seqs, h[torch.arange(len(seqs), device=dev), torch.tensor(lengths, device=dev) - 1])

    def _read_part(self, seq: Sequence, row: int, s: int, e: int) -> torch.Tensor:
        """Read prompt tokens [s, e) into `row`, attending to its slots before s; the last hidden state."""
        dev = self.device
        pos = torch.arange(s, e, device=dev)[None]
        mask = None if s == 0 else attention_mask_4d(torch.ones((1, e), dtype=torch.bool, device=dev), e - s)
        ctx = self._context(pos, [seq.alpha], mask=mask, last=e - 1)
        ctx.cache = RowWriter(self.kv, row, start=s)
        h = self.model.run_blocks(torch.tensor([seq.prompt[s:e]], device=dev), ctx)
        seq.cached = e
        if seq.prompt_logprobs is not None:
            self._prompt_logprobs(seq, h[0], s)
        return h[:, -1]

    def _read_chunk(self, seq: Sequence) -> None:
        """Read the next `prefill_chunk` tokens of a long prompt into the top row (each chunk attends to
        every slot before it); after the last, the row moves next to the running ones and joins them."""
        top = self.max_num_seqs - 1
        s = seq.cached
        if s == 0:
            self._set_alpha(seq)
            seq.row = top
            self._vacate(top)
        e = min(len(seq.prompt), s + self.prefill_chunk)
        h = self._read_part(seq, top, s, e)
        self.stats["prompt_chunks"] += 1
        if e < len(seq.prompt):
            return
        if len(self.active) != top:
            # a conversation parked where the row goes moves away first (while `seq` still holds the top row)
            self._vacate(len(self.active))
            self.kv.move_row(top, len(self.active), e)
        self.admitted.remove(seq)
        self._joined(seq, h)

    def _joined(self, seq: Sequence, h: torch.Tensor) -> None:
        """`seq`'s prompt is read into row len(active), `h` its last hidden state: it joins the running
        rows with its first token."""
        self._join(seq)
        self._first_tokens([seq], h)

    def _first_tokens(self, seqs: list[Sequence], h: torch.Tensor) -> None:
        """Sample the first token of sequences whose prompts were just read (`h`: their last hidden states)."""
        self.stats["prefills"] += 1
        self._sample(seqs, self.model.lm_head(h).float())

    # ---- prefix cache -----------------------------------------------------------------------
    def _claim(self, seq: Sequence, unread: list[Sequence] = ()) -> bool:
        """If `seq`'s prompt starts with a parked row's tokens, it takes that row, or with a running
        sequence's (not one of `unread`), a copy of its slots; either way it reads only the rest: in
        this step when the rest fits a step's chunk (it joins the running rows now, in the next row,
        and True is returned: `_read_rests` reads the rest), otherwise in the top row as a long prompt
        (if no other is being read there)."""
        self._set_alpha(seq)
        if seq.prompt_logprobs is not None:
            return False  # every prompt token's log-probability is asked for: no keys/values reused
        best, keep, lent = -1, 0, False
        for row, p in self._parked.items():
            if p["alpha"] == seq.alpha:  # (keys are rotated with the alpha their prompt had)
                n = common_prefix(seq.prompt, p["tokens"])
                if n > keep:
                    best, keep = row, n
        m = self.prefix_min
        for row, s in enumerate(self.active):  # a running sequence lends what its slots hold (a copy)
            if s.alpha == seq.alpha and s.cached >= m and s.prompt[:m] == seq.prompt[:m] and s not in unread:
                n = common_prefix(seq.prompt, (s.prompt + s.generated)[:s.cached])
                if n > keep:
                    best, keep, lent = row, n, True
        if keep < m:
            return False
        top, chunk = self.max_num_seqs - 1, self.prefill_chunk
        long = bool(chunk) and len(seq.prompt) - keep > chunk
        if long and self._reading:
            return False  # the top row is taken
        dst = top if long else len(self.active)
        if lent:  # (dst is past every running row: the lender's stays as it is)
            self._vacate(dst)
            self.kv.move_row(best, dst, keep)
        elif dst != best:
            if dst in self._parked:  # swap: the parked row there lives on where this one was
                self.kv.swap_rows(best, dst, keep, len(self._parked[dst]["tokens"]))
                self._parked[best] = self._parked.pop(dst)
            else:
                self.kv.move_row(best, dst, keep)
                del self._parked[best]
        else:
            del self._parked[best]
        seq.row, seq.cached, seq.reused = dst, keep, keep
        self.stats["prompt_tokens_reused"] += keep
        if long:
            return False  # `_plan` gives it the top row's chunks from here
        self.admitted.remove(seq)
        self._join(seq)
        return True

    def _twins(self) -> list[Sequence]:
        """The admitted prompts, not yet started, that share at least `prefix_min` leading tokens (and
        the NTK alpha) with an earlier one that will be read: they wait for it, then copy its keys/values."""
        readers: list[tuple[list[int], float]] = []
        held = []
        m = self.prefix_min
        for seq in self.admitted:
            alpha = prompt_alpha(self.model, len(seq.prompt))
            if not seq.cached and seq.prompt_logprobs is None and len(seq.prompt) > m and any(
                    a == alpha and p[:m] == seq.prompt[:m] and common_prefix(seq.prompt, p) >= m for p, a in readers):
                held.append(seq)
            else:
                readers.append((seq.prompt, alpha))
        return held

    def _read_rests(self, seqs: list[Sequence]) -> None:
        """Read the rest of each claimed prompt (after its `reused` slots) and sample its first token:
        one at a time where prompts are (the CPU), else together, right-padded, up to
        `max_prefill_tokens` padded tokens a pass (their rows are consecutive: claimed in order)."""
        group: list[Sequence] = []
        for seq in seqs:
            if not self.batch_prefill:
                self._first_tokens([seq], self._read_part(seq, seq.row, seq.reused, len(seq.prompt)))
                continue
            width = max(len(s.prompt) - s.reused for s in group + [seq])
            if group and width * (len(group) + 1) > self.max_prefill_tokens:
                self._extend(group)
                group = []
            group.append(seq)
        if group:
            self._extend(group)

    def _extend(self, seqs: list[Sequence]) -> None:
        """One forward pass for the rests of claimed prompts in rows [seqs[0].row, +len(seqs)): row b's
        token j is at position reused_b + j and attends to its slots up to there; padding tokens
        write a slot no sequence fills."""
        m, dev = self.model, self.device
        starts = torch.tensor([s.reused for s in seqs], device=dev)
        lengths = torch.tensor([len(s.prompt) - s.reused for s in seqs], device=dev)
        t = int(lengths.max())
        span = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([s.prompt[s.reused:] + [0] * (t - len(s.prompt) + s.reused) for s in seqs], device=dev)
        pos = starts[:, None] + torch.arange(t, device=dev)[None]  # (B, T)
        valid = torch.arange(t, device=dev)[None] < lengths[:, None]
        mask = (torch.arange(span, device=dev)[None, None] <= pos[:, :, None])[:, None]  # (B, 1, T, span)
        ctx = self._context(pos, [s.alpha for s in seqs], mask=mask, last=span - 1)
        ctx.cache = ExtendWriter(self.kv, seqs[0].row, pos.masked_fill(~valid, self.max_model_len - 1), span)
        h = m.run_blocks(ids, ctx)
        self._first_tokens(seqs, h[torch.arange(len(seqs), device=dev), lengths - 1])

    def _vacate(self, row: int) -> None:
        """`row` is about to be written: a sequence parked there moves to a free row if there is one
        (the top row only while no long prompt is being read), else it is forgotten."""
        parked = self._parked.pop(row, None)
        if parked is None:
            return
        top = self.max_num_seqs - 1
        reading = self._reading is not None
        free = [r for r in range(len(self.active) + 1, self.max_num_seqs)
                if r != row and r not in self._parked and not (r == top and reading)]
        if free:
            self.kv.move_row(row, free[0], len(parked["tokens"]))
            self._parked[free[0]] = parked

    def _context(self, pos: torch.Tensor, alphas: list[float], mask, last: int) -> ForwardContext:
        """Rotary tables (and LogN past the trained length) for positions `pos`, the largest `last`."""
        m, c = self.model, self.cfg
        a = None if all(x == 1.0 for x in alphas) else torch.tensor(alphas)
        cos, sin = rotary_cos_sin(pos, c.head_dim, c.rope_theta, a)
        logn = None
        if m.use_logn_attn and last + 1 > c.seq_length:
            logn = logn_scale(pos, c.seq_length)
        return ForwardContext(cos=cos, sin=sin, logn=logn, mask=mask, cache=None)

    def _decode(self) -> None:
        """One decode step of the running rows. Run ahead (`pipeline`), it leaves its tokens on the
        device for the next step and hands out those of the step before it; else it hands out its own."""
        seqs = list(self.active)
        ahead = self._ahead
        run_ahead = self.pipeline and all(self._may_run_ahead(s) for s in seqs)
        index = {} if ahead is None else {id(s): j for j, s in enumerate(ahead["seqs"])}
        if ahead is not None and not (run_ahead and all(id(s) in index for s in seqs)):
            self._land()  # (`step` hands it out before any row joins: a row outside it is a bug caught here)
            seqs, ahead = list(self.active), None
            if not seqs:
                return
        n, ids = len(seqs), self.sampler.ids
        # a row that the step in flight ends by its budget or the context is a padding row of this one
        ends = [ahead is not None and self._ends_by_length(s) for s in seqs]
        live = [i for i, e in enumerate(ends) if not e]
        if not live:
            self._land()
            return
        if ahead is None:
            tok = ids([s.generated[-1] for s in seqs])
        else:  # each row's input is the token that the step in flight chose for it, still on the device
            tok = ahead["tokens"][ids([index[id(s)] for s in seqs])]
        positions = [self.max_model_len - 1 if e else s.cached + s.inflight for s, e in zip(seqs, ends)]
        pos = ids(positions)  # the new token's slot and position
        length = max(positions[i] for i in live) + 1
        alphas = [s.alpha for s in seqs]
        if self.static_shapes:
            logits = self._fixed_shape_step(n, tok, pos, alphas, length)
        else:
            ctx = self._context(pos[:, None], alphas, mask=None, last=length - 1)
            cos, sin = ctx.cos[:, 0], ctx.sin[:, 0]
            logn = ctx.logn[:, 0] if ctx.logn is not None else None
            if self._packs:
                from ..quant.q4 import fused_decode

                valid = torch.arange(self.max_model_len, device=self.device)[None] <= pos[:, None]  # (n, S)
                logits = self.model.lm_head(fused_decode(self.model, self._packs, tok, cos, sin, logn, self.kv, pos,
                                                         valid, length))
            else:
                logits = self._rows_step(n, length, tok, pos, cos, sin, logn)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        if not run_ahead:
            for s in seqs:
                s.cached += 1
            self._sample(seqs, logits.float())
            return
        rows = [seqs[i] for i in live]
        chosen = self.sampler.pick(rows, (logits if len(live) == n else logits[ids(live)]).float())
        if len(live) < n:  # (indexed like `seqs`; a padding row's entry is never read)
            chosen = torch.zeros(n, dtype=torch.long, device=self.device).index_copy_(0, ids(live), chosen)
        for s in rows:
            s.inflight += 1
        step = {"seqs": seqs, "live": live, "tokens": chosen, "host": None, "event": None}
        if self.device.type == "cuda":  # its tokens come to the host while the device goes on
            step["host"] = torch.empty(n, dtype=torch.long, pin_memory=True)
            step["host"].copy_(chosen, non_blocking=True)
            step["event"] = torch.cuda.Event()
            step["event"].record()
        self._ahead = step
        self.stats["steps_ahead"] += 1
        if ahead is not None:
            self._land(ahead)
        if all(s.finish_reason is not None for s in rows):
            self._ahead = None  # every row of the step in flight stopped meanwhile: nothing of it is wanted

    @staticmethod
    def _may_run_ahead(seq: Sequence) -> bool:
        """Whether the step after this one can be queued before `seq`'s token is on the host."""
        c = seq.cfg
        return (seq.constraint is None and seq.logprobs is None and not c.logit_bias and seq.alpha == 1.0
                and not (c.presence_penalty or c.frequency_penalty))

    def _ends_by_length(self, seq: Sequence) -> bool:
        """Whether handing out the tokens of `seq`'s steps in flight ends it by its budget or the context
        (as `_take` would find)."""
        k = seq.inflight
        return k > 0 and (len(seq.generated) + k >= seq.cfg.max_new_tokens
                          or seq.cached + k + 1 >= self.max_model_len)

    def _land(self, step: dict | None = None) -> None:
        """Hand out the tokens of a step run ahead (by default the one in flight, which is then over):
        each of its live rows that has not finished meanwhile takes its token as `_sample` gives one."""
        if step is None:
            step, self._ahead = self._ahead, None
            if step is None:
                return
        if step["event"] is not None:
            step["event"].synchronize()
            values = step["host"].tolist()
        else:
            values = step["tokens"].tolist()
        for i in step["live"]:
            seq = step["seqs"][i]
            seq.inflight -= 1
            if seq.finish_reason is None:  # (one that stopped at the step before was in this one for nothing)
                seq.cached += 1
                self._take(seq, values[i])

    def _rows_step(self, n: int, length: int, tok, pos, cos, sin, logn) -> torch.Tensor:
        """The per-op decode step of rows [0, n) reading slots [0, length): only tensor operations on
        the given tensors, so that it can be captured in a CUDA graph. Returns the logits."""
        m, dev = self.model, self.device
        ctx = ForwardContext(cos=cos[:, None], sin=sin[:, None], logn=None if logn is None else logn[:, None],
                             mask=None, cache=None)
        writer = StepWriter(self.kv, n, pos, length)
        if self._kernel_attention:  # Triton: reads the valid slots (and 8-bit codes) directly
            # a padding row (its slot the last, which no sequence fills) reads one slot, not `length`
            end = torch.where(pos >= self.max_model_len - 1, 1, pos + 1)
            ctx.decode = KernelAttention(self.kv, writer.write, torch.zeros_like(pos), end, length,
                                         slots=pos if self._fused_rotary else None)
        else:
            ctx.mask = (torch.arange(length, device=dev)[None] <= pos[:, None])[:, None, None, :]
            ctx.cache = writer
        return m.lm_head(m.run_blocks(tok[:, None], ctx)[:, -1])

    def _fixed_shape_step(self, n: int, tok, pos, alphas: list[float], length: int) -> torch.Tensor:
        """The step at a fixed shape: rows [0, n) copied into buffers padded to `nb` rows, slots
        rounded up to the bucket; on CUDA, replayed from a graph captured the first time. The padding
        rows are other cache rows (free, parked, or the top one with a long prompt being read): they
        write their last slot, which no sequence ever fills (`_sample` ends a sequence before), so
        they disturb nothing. Rotary values come from a table indexed inside the step (and LogN from
        the positions), unless a row has its own NTK alpha: then they are computed here and copied in."""
        c, dev = self.cfg, self.device
        nb = min(1 << (n - 1).bit_length(), self.max_num_seqs)
        lb = min(self.bucket * -(-length // self.bucket), self.max_model_len)
        if self._buf is None:
            rows, d = self.max_num_seqs, c.head_dim
            table = rotary_cos_sin(torch.arange(self.max_model_len, device=dev)[None], d, c.rope_theta)
            self._buf = {"tok": torch.zeros(rows, dtype=torch.long, device=dev),
                         "pos": torch.zeros(rows, dtype=torch.long, device=dev),
                         "cos": torch.ones(rows, d, device=dev), "sin": torch.zeros(rows, d, device=dev),
                         "cos_table": table[0][0], "sin_table": table[1][0]}
        b = self._buf
        b["tok"][:n] = tok
        b["pos"][:n] = pos
        b["pos"][n:nb] = self.max_model_len - 1
        ntk = any(a != 1.0 for a in alphas)
        if ntk:
            ctx = self._context(pos[:, None], alphas, mask=None, last=length - 1)
            b["cos"][:n] = ctx.cos[:, 0]
            b["sin"][:n] = ctx.sin[:, 0]
        with_logn = self.model.use_logn_attn and length > c.seq_length

        def run():
            p = b["pos"][:nb]
            if ntk:
                cos, sin = b["cos"][:nb], b["sin"][:nb]
            else:
                cos, sin = b["cos_table"][p], b["sin_table"][p]
            logn = logn_scale(p, c.seq_length) if with_logn else None
            return self._rows_step(nb, lb, b["tok"][:nb], p, cos, sin, logn)

        if not self.cuda_graphs:
            return run()[:n]
        key = (nb, lb, with_logn, ntk)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(run)
            except Exception as e:  # a step that cannot be captured must not fail the requests
                log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(e).__name__, e)
                self.cuda_graphs = False
                self._graphs.clear()
                self._pool = None
                return run()[:n]
            self.stats["graphs"] = len(self._graphs)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:n]

    def _capture(self, run) -> tuple:
        """Warm `run` up on a side stream (repeating a step rewrites the same slots), then capture it.
        One side stream for all captures (a new stream would get its own cuBLAS workspace each time)."""
        stream = self._warm_stream = self._warm_stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph, out

    # ---- choosing tokens, finishing -------------------------------------------------------
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        asked = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        if asked:
            lp = self._log_probs(logits[asked])
        chosen = self.sampler.choose(seqs, logits)
        if asked:  # (one gather and one top-k for all the rows that ask: each is a transfer on a GPU)
            ks = [seqs[i].logprobs for i in asked]
            for i, k, (got, top) in zip(asked, ks, _entries(lp, [chosen[i] for i in asked], max(ks))):
                seqs[i].token_logprobs.append((got, top[:k]))
        for s, t in zip(seqs, chosen):
            self._take(s, t)

    def _take(self, s: Sequence, t: int) -> None:
        """`s` (its step's slot counted in `cached`) gets its next token `t`: stop rules, budget, emit."""
        s.generated.append(t)
        s.counts[t] = s.counts.get(t, 0) + 1
        self.stats["generation_tokens"] += 1
        reason = None
        if s.stop.done(s.generated):
            reason = "stop"
        elif len(s.generated) >= s.cfg.max_new_tokens or s.cached + 1 >= self.max_model_len:
            reason = "length"
        if reason is None:
            s.emit(t, None)
        else:
            s.finish_reason = reason
            self._finish(s, reason)
            s.emit(t, reason)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log-softmax over the tokens the model may choose (the vocabulary's padding left out)."""
        limit = self.sampler.vocab_limit
        return torch.log_softmax(logits[:, :limit].float(), -1)

    def _prompt_logprobs(self, seq: Sequence, h: torch.Tensor, start: int) -> None:
        """Log-probabilities of the prompt tokens that the hidden states `h` of positions start..
        predict, a slice of positions at a time (a whole prompt's logits would be prompt x vocab floats)."""
        n = min(h.shape[0], len(seq.prompt) - 1 - start)
        for a in range(0, n, 128):
            b = min(n, a + 128)
            lp = self._log_probs(self.model.lm_head(h[a:b]))
            seq.prompt_token_logprobs += _entries(lp, seq.prompt[start + a + 1:start + b + 1], seq.prompt_logprobs)

    def _finish(self, seq: Sequence, reason: str, emit_none: bool = False) -> None:
        """Take `seq` out of the batch; the last row moves into its place (with the prefix cache on,
        the two swap, and `seq`'s keys/values stay parked in the last row)."""
        row, last = seq.row, len(self.active) - 1
        park = self.prefix_cache and seq.cached > 0
        if row != last:
            mover = self.active[last]
            filled = mover.cached + mover.inflight  # (with the slots its steps in flight write: queued before)
            if park:
                self.kv.swap_rows(row, last, seq.cached, filled)
            else:
                self.kv.move_row(last, row, filled)
            if mover.cfg.repetition_penalty != 1.0:
                self.sampler.move(last, row)
            self.active[row] = mover
            mover.row = row
        self.active.pop()
        if park:
            self._parked[last] = {"tokens": (seq.prompt + seq.generated)[:seq.cached], "alpha": seq.alpha}
        seq.row = -1
        self.stats[f"finished_{reason}"] += 1
        if emit_none:
            seq.finish_reason = reason
            seq.emit(None, reason)


def _entries(lp: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(logprob of tokens[i], its row's k likeliest (id, logprob)) for each row i of `lp`."""
    got = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if not k:
        return [(g, []) for g in got]
    top = lp.topk(min(k, lp.shape[-1]), -1)
    return [(g, list(zip(i, v))) for g, i, v in zip(got, top.indices.tolist(), top.values.tolist())]
