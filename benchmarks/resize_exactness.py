"""How exactly a DeepSpeed checkpoint resumes on another world size through pipeline/distributed.py's
`load_resized` (DeepSpeed's universal checkpoint, with our repairs of its ZeRO-3 load): a two-group model
(different learning rates and weight decay, as our backbone / no-decay groups) trained with torch's AdamW for
3 steps on N gloo ranks, checkpointed, resumed on M ranks for 3 more steps, against 1 rank trained 6 steps on
the same global batches. Prints the largest weight difference per ZeRO stage and direction, and with
--unrepaired the ZeRO-3 figure without the repairs. CPU only, a minute or two per case.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/resize_exactness.py [--stages 0 1 2 3] [--unrepaired]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

STEPS = 3
GLOBAL_BATCH = 4


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))


def sample(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step * 100 + index)
    return torch.randn(1, 8, generator=generator), torch.randn(1, 3, generator=generator)


def train(rank: int, world: int, port: int, stage: int, load_from: str | None, save_to: str | None, first_step: int,
          out: str, repaired: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from pipeline import distributed

    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model()
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.05, "lr": 1e-2, "name": "decay"},
              {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0,
               "lr": 1e-3, "name": "no_decay"}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    accumulation = GLOBAL_BATCH // world
    resized = load_from is not None and stage > 0
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation,
              "train_batch_size": GLOBAL_BATCH, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if resized:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if resized:
        if not repaired:
            distributed._repair_zero3_universal_load = lambda *args: None
        distributed.load_resized(engine, load_from, "state", f"resize_exactness_{stage}_{port}")
    elif load_from is not None:
        engine.load_checkpoint(load_from, tag="state")
    for step in range(first_step, first_step + STEPS * (2 if load_from is None and save_to is None else 1)):
        for micro_step in range(accumulation):
            inputs, targets = sample(step, rank * accumulation + micro_step)
            engine.backward(((engine(inputs) - targets) ** 2).mean())
            engine.step()
    if save_to is not None:
        engine.save_checkpoint(save_to, tag="state", client_state=distributed.checkpoint_client_state())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        weights = {name: value.detach().float().clone() for name, value in engine.module.state_dict().items()}
    if rank == 0:
        torch.save(weights, out)


def run(world: int, *args) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(train, args=(world, port, *args), nprocs=world, join=True)


def largest_difference(stage: int, before: int, after: int, folder: Path, repaired: bool) -> float:
    run(1, stage, None, None, 0, str(folder / "reference.pt"), repaired)
    run(before, stage, None, str(folder / "checkpoint"), 0, str(folder / "first.pt"), repaired)
    run(after, stage, str(folder / "checkpoint"), None, STEPS, str(folder / "resumed.pt"), repaired)
    reference, resumed = torch.load(folder / "reference.pt"), torch.load(folder / "resumed.pt")
    return max((reference[name] - resumed[name]).abs().max().item() for name in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--unrepaired", action="store_true", help="also ZeRO-3 without our repairs")
    args = parser.parse_args()
    cases = [(stage, before, after, True) for stage in args.stages for before, after in ((2, 1), (1, 2))]
    if args.unrepaired:
        cases.append((3, 2, 1, False))
    for stage, before, after, repaired in cases:
        with tempfile.TemporaryDirectory() as folder:
            difference = largest_difference(stage, before, after, Path(folder), repaired)
        note = "" if repaired else " (without the ZeRO-3 repairs)"
        print(f"ZeRO-{stage} {before} -> {after} ranks: largest weight difference {difference:.2e}{note}", flush=True)


if __name__ == "__main__":
    main()
