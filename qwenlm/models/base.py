"""The forward skeleton shared by the architecture files: positions, masks, NTK/LogN, logits.

An architecture subclass builds its modules with the checkpoint's own names and provides
`embed`, `blocks`, `final_norm` and `lm_head`; this class owns everything around the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..generation.api import GenerationMixin
from ..generation.config import GenerationConfig
from .layers import (ForwardContext, GemvLinear, KVCache, add_rms_norm, attention_mask_4d, logn_scale, ntk_alpha,
                     residual_fusion, rotary_cos_sin)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    past_key_values: KVCache | None = None
    loss: torch.Tensor | None = None

    def __getitem__(self, i):
        return (self.logits, self.past_key_values)[i] if self.loss is None else (
            self.loss, self.logits, self.past_key_values)[i]


class QwenCausalLM(GenerationMixin, nn.Module):
    """Base of the architecture classes. `forward(input_ids, attention_mask=None, ...)`."""

    config: ModelConfig
    # how the engines keep keys/values: "float" (the model's dtype) or "int8" (engine/cache.py)
    kv_cache: str = "float"

    def __init__(self, config: ModelConfig, use_dynamic_ntk: bool, use_logn_attn: bool):
        super().__init__()
        self.config = config
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.generation_config = GenerationConfig()

    # provided by subclasses
    embed: nn.Embedding
    blocks: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Linear

    @property
    def context_window(self) -> int:
        """Most tokens (prompt and reply) one sequence may hold. Qwen2 family and Qwen v1 without
        dynamic NTK (72B): the trained length. Qwen v1 with dynamic NTK reaches beyond its
        `seq_length` by design; the original's LogN table stops at 32,767 positions."""
        c = self.config
        if c.arch == "qwen":
            return max(c.max_position_embeddings, 32768) if self.use_dynamic_ntk else c.seq_length
        return c.max_position_embeddings

    @property
    def kv_int8(self) -> bool:
        """Whether the engines keep keys/values in 8 bits (`kv_cache == "int8"`)."""
        return self.kv_cache == "int8"

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks), int8=self.kv_int8)

    def _context(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 b: int, t: int, cache: KVCache | None, device) -> ForwardContext:
        cfg = self.config
        past = cache.seq_len if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] != past + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, "
                             f"expected past ({past}) + new ({t})")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + t, device=device).expand(b, -1)
        alphas = None
        if self.use_dynamic_ntk and not self.training:
            if cache is not None and cache.ntk_alphas is not None and past > 0:
                alphas = cache.ntk_alphas  # frozen at prefill, like the original
            else:
                lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [past + t] * b
                alphas = torch.tensor([float(ntk_alpha(n, cfg.seq_length)) if n > cfg.seq_length else 1.0
                                       for n in lengths])
                if cache is not None:
                    cache.ntk_alphas = alphas
            if bool((alphas == 1).all()):
                alphas = None
        cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, alphas)
        logn = None
        if self.use_logn_attn and not self.training and int(position_ids.max()) + 1 > cfg.seq_length:
            logn = logn_scale(position_ids, cfg.seq_length)
        mask = None
        if padded or (past > 0 and t > 1):
            valid = attention_mask if attention_mask is not None else torch.ones(b, past + t, device=device)
            mask = attention_mask_4d(valid.to(device), t)
        return ForwardContext(cos=cos, sin=sin, logn=logn, mask=mask, cache=cache)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **ignored) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, past+T) of 1/0; returns logits (B, T, V)."""
        b, t = input_ids.shape
        cache = past_key_values if past_key_values is not None else (self.new_cache() if use_cache else None)
        if cache is not None:  # an int8 cache centers keys over the valid tokens of the first chunk
            cache.chunk_mask = attention_mask[:, -t:] if attention_mask is not None else None
        ctx = self._context(attention_mask, position_ids, b, t, cache, input_ids.device)
        logits = self.lm_head(self.run_blocks(input_ids, ctx))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(logits=logits, past_key_values=cache, loss=loss)

    def run_blocks(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Embedding, blocks and final norm under a prepared context -> hidden states (B, T, H).
        The engine calls this with its own context (static cache, precomputed rotary tables)."""
        h = self.embed(input_ids)
        if residual_fusion(h):  # each block's last residual add is done by the next norm's kernel
            add = None
            for i, block in enumerate(self.blocks):
                h, add = block.residual_step(h, add, ctx, i, True)
            return add_rms_norm(h, add, self.final_norm, True)[1]
        for i, block in enumerate(self.blocks):
            h = block(h, ctx, i)
        return self.final_norm(h)

    def use_gemv(self, on: bool = True) -> int:
        """Send the one-row products of every float linear layer of the blocks and of the head through
        the Triton kernel (layers.GemvLinear: the same modules, their class changed; fused groups too),
        or with `on=False` back through F.linear. Returns how many layers now use the kernel."""
        n = 0
        for module in [*self.blocks.modules(), self.lm_head]:
            if type(module) is (nn.Linear if on else GemvLinear):
                module.__class__ = GemvLinear if on else nn.Linear
            n += type(module) is GemvLinear
            fused = module.__dict__.get("_fused")
            if fused is not None:
                fused.gemv = on
        return n

    def fuse_projections(self) -> int:
        """Fuse each block's linear layers that share an input (gate/up, and q/k/v where separate) into
        one matmul each: fewer, longer matmuls per decode step (the engines do this on GPU). Memory and
        state_dict are unchanged; quantized layers are left alone. Returns how many groups are fused."""
        return sum(block.fuse() for block in self.blocks)

    def replace_module(self, name: str, new: nn.Module) -> None:
        """Put `new` where the submodule `name` is (quantized layers replacing linear ones)."""
        parent, _, attr = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attr, new)

    def block_linears(self) -> list[tuple[str, nn.Linear]]:
        """(full name, layer) of every nn.Linear inside the decoder blocks (not the head)."""
        inside = {id(b) for b in self.blocks}
        out, prefix = [], None
        for name, mod in self.named_modules():
            if id(mod) in inside:
                prefix = name + "."
            elif prefix and name.startswith(prefix) and isinstance(mod, nn.Linear):
                out.append((name, mod))
        return out

    def tie_weights(self) -> None:
        w = getattr(self.embed, "weight", None)  # (a Parameter, or the buffer of a table kept as stored;
        # none for a table left in a GGUF file's blocks, whose head comes from the file)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear) and w is not None:
            self.lm_head.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
