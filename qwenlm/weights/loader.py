"""Checkpoint loading: single or sharded `.safetensors` / `.bin` files into a model, strictly.

The model is built on the meta device and each tensor is moved into place one at a time, so the
peak memory is the model plus one tensor. Any mismatch (missing, unexpected, mis-shaped tensors,
missing or damaged shard) is reported in one error that lists everything.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from typing import Callable, Iterable, Iterator

import torch

log = logging.getLogger("qwenlm")

# buffers of the original code that some checkpoints carry: never needed
_IGNORABLE = [re.compile(p) for p in (r".*rotary_emb\.inv_freq$", r".*attn\.masked_bias$",
                                      r".*attn\.bias$", r".*\.logn_tensor$")]
_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class CheckpointError(ValueError):
    """The checkpoint's files do not match the model its config describes."""


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (from its index when sharded)."""
    for index_name, single in _WEIGHT_FILES:
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{len(missing)} shard(s) listed in {index_name} are missing from "
                                      f"{path}: {', '.join(missing)} (incomplete download?)")
            return [os.path.join(path, f) for f in files]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    others = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if others:
        return [os.path.join(path, f) for f in others]
    raise CheckpointError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin "
                          "or their .index.json")


def checkpoint_names(files: list[str]) -> set[str]:
    """The tensor names of checkpoint files (safetensors: read from the header only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    names.update(f.keys())
                continue
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: it is damaged or truncated ({e})") from e
        names.update(name for name, _ in iter_tensors([path]))
    return names


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from every file; safetensors and .bin files are memory-mapped."""
    from safetensors import safe_open

    for path in files:
        try:
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                yield from state.items()
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {path}: it is damaged or truncated "
                                  f"({type(e).__name__}: {str(e)[:200]})") from e
        except Exception as e:  # safetensors raises its own SafetensorError
            if type(e).__name__ != "SafetensorError":
                raise
            raise CheckpointError(f"cannot read {path}: it is damaged or truncated ({e})") from e


def load_weights(model: torch.nn.Module, files: list[str], dtype: torch.dtype,
                 device: torch.device, extra: Iterable[tuple[str, torch.Tensor]] = (),
                 deferred: frozenset[str] | set[str] = frozenset(),
                 consume: Callable[[str, torch.Tensor], bool] | None = None) -> None:
    """Fill a (meta-device) model from checkpoint files, then `extra` (name, tensor) pairs; raise one
    CheckpointError on mismatch. `deferred`: weights left on the meta device, that the caller fills
    (a lean GGUF checkpoint's blocks). `consume(name, tensor)`: offered each weight as it is read
    (as stored, memory-mapped); True means the caller has placed it (quantized it into its layer)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    seen: set[str] = set(deferred)
    unexpected, misshaped = [], []
    params = dict(model.named_parameters())
    for name, tensor in itertools.chain(iter_tensors(files), extra):
        if name not in expected:
            if not any(p.match(name) for p in _IGNORABLE):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name]):
            misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name])}")
            seen.add(name)  # present, so not also "missing"
            continue
        seen.add(name)
        if consume is not None and consume(name, tensor):
            continue
        # integer tensors (GPTQ codes, group indices) keep their type
        _assign(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None), params)
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if tied else set()))
    if missing or unexpected or misshaped:
        lines = ["the checkpoint does not match the model described by config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                             ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20])
                             + (f", ... (+{len(items) - 20})" if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    model.tie_weights()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor, params: dict) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if name in params:
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(attr, tensor)
