"""Triton kernels for OneFormer, each beside the one plain-PyTorch reference that tests, benchmarks and the
CPU path share. Nothing here imports the model, the data pipeline, ray, deepspeed or mlflow."""

from kernels._backend import BackendUnavailableError, choose_backend
from kernels.ms_deform_attn import ms_deform_attn

__all__ = ["BackendUnavailableError", "choose_backend", "ms_deform_attn"]
