"""One description of a Triton kernel launch, shared by the wrappers that run it and by the compile check
(`python -m kernels.compile_check`) that compiles it for a GPU this machine may not have.

Every op builds its launches in one function per kernel (`*_launch` in its triton_kernels.py): the argument
order, the compile-time parameters and the launch configuration are decided there and nowhere else, so the
configuration the check reports on is the one the wrapper runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelLaunch:
    """A kernel with its grid, positional arguments (tensors and ints, in the kernel's order) and keyword
    arguments (constexprs and compiler options such as num_warps / maxnreg)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self):
        return self.kernel[self.grid](*self.args, **self.kwargs)

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__
