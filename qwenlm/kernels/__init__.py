"""GPU kernels written in Triton: GPTQ dequantize-and-multiply (`gptq.py`), decode attention over
the engines' KV store, float or 8-bit (`attention.py`), one row times a float weight (`gemv.py`), and a
decode step's rotary embedding with its cache write (and an 8-bit cache's quantization: `rotary.py`).

They run on CUDA tensors. `QWENLM_TRITON=interpret` runs them on any device in Triton's interpreter
(the CPU tests do this): that checks their arithmetic, not their speed. `QWENLM_TRITON=0` turns them off.
"""

from __future__ import annotations

import os
from functools import lru_cache

# the kernels were written, checked and timed with fused multiply-adds (Triton's default up to 3.9, which
# warns that 3.10 turns them off): keep them whatever Triton's version, unless the environment says otherwise
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports and the kernels are not turned off."""
    mode = os.environ.get("QWENLM_TRITON", "1")
    if mode == "0":
        return False
    if mode == "interpret":  # must be set before triton.jit sees the kernels
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def usable_on(device) -> bool:
    """Whether the kernels can run for tensors on `device`: CUDA with Triton, or any device in the
    interpreter."""
    if not triton_available():
        return False
    if os.environ.get("QWENLM_TRITON") == "interpret":
        return True
    return getattr(device, "type", str(device)) == "cuda"


_checked: dict[tuple, bool] = {}


def kernel_works(kind: str, device, dtype, **options) -> bool:
    """Run kernel `kind` ("attention", "gptq", "gemv" or "rotary") once on a small random problem on `device` against
    plain torch arithmetic; False (with one warning) if it fails to compile, raises or disagrees, so the
    caller keeps its torch path. The answer is remembered per device, dtype and options."""
    if not usable_on(device):
        return False
    key = (kind, str(device), dtype, tuple(sorted(options.items())))
    if key not in _checked:
        import torch

        try:
            if kind == "attention":
                from .attention import self_check
            elif kind == "gemv":
                from .gemv import self_check
            elif kind == "rotary":
                from .rotary import self_check
            else:
                from .gptq import self_check
            with torch.inference_mode():
                problem = self_check(torch.device(device), dtype, **options)
        except Exception as e:  # a compiler or driver that the kernel does not suit
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if problem:
            import logging

            logging.getLogger("qwenlm").warning("Triton %s kernel off on %s for %s (%s): using the torch path",
                                                kind, device, dtype, problem)
        _checked[key] = not problem
    return _checked[key]
