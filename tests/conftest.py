"""Test-wide environment. Set before anything imports triton or deepspeed: Triton decides at kernel definition
whether to interpret, and DeepSpeed picks its accelerator at import."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run on CPU tensors through the interpreter, DeepSpeed on its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
