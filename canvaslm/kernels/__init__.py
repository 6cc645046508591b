"""Triton kernels for the fast path, each next to the PyTorch reference it is tested against.

Triton is optional (`pip install canvaslm[gpu]`). Kernels run on CUDA tensors, or on CPU tensors when
Triton was imported in interpreter mode (`TRITON_INTERPRET=1` set before the first `import triton`;
the kernel tests do that). Everything here has a pure-PyTorch path, so nothing needs Triton on CPU.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # missing, or a broken install: the PyTorch paths serve
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors are then allowed)."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # the choice is frozen when triton.language is first imported: check its own jitted functions
    return isinstance(tl.max, InterpretedFunction) and os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t) -> bool:
    """Whether a Triton kernel can run on tensor t's device."""
    if not triton_available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
