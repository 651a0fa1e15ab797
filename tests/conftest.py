"""Test-wide environment. Set before anything imports triton or deepspeed: Triton decides at kernel definition
whether to interpret, and DeepSpeed picks its accelerator at import."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run on CPU tensors through the interpreter, DeepSpeed on its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Ray's memory monitor kills the newest workers of *its own* instance once the whole node passes 95% memory,
# whoever uses it: on a shared machine a concurrent heavy job (a 16-20 GB DiNAT-L run beside the suite; raylet
# logs: "Killing 4 worker(s) ... Memory on the node was 22.70GB used / 23.54GB", 1 GB demo workers killed)
# made the suite's small Ray Train workers die ("The actor died unexpectedly"). The tests' Ray instances leave
# out-of-memory decisions to the kernel, which picks the process that actually holds the memory.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for CPU-heavy model tests: on a shared machine two contended threads are several
    times slower than one. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def tracking_uri_unchanged():
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in the environment, which the trainer rightly
    obeys: a tracker made in one test must not redirect the jobs of the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
