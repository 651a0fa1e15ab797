"""The one place a process connects to Ray (training, preprocessing and evaluation all come through here)."""

from __future__ import annotations


def connect_ray(address: str | None, **options) -> bool:
    """Join the Ray cluster at `address` (None: the one this process runs in, else a new local one) unless
    this process is connected already; True when this call connected (and so should shut Ray down)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, **options)
    return True
