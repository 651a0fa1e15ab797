"""The task and text token contract between the data and the model, in one place.

- The task token: "the task is {task}" (`task_prompt`), for each of TASKS.
- The text list of an image for the query-text contrastive loss: `num_queries - text_num_context` entries;
  each ground-truth mask contributes "a photo with a {class}" (`class_prompt`), the rest are the task's
  padding text (TASK_PADDING_TEXT). The data pipeline builds it with `TextTokenTable`; the model's text
  mapper encodes it.
"""

from __future__ import annotations

import numpy as np
import torch

from model.tokenizer import tokenize

TASKS = ("semantic", "instance", "panoptic")
TASK_PADDING_TEXT = {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "a panoptic photo"}


def task_prompt(task: str) -> str:
    return f"the task is {task}"


def class_prompt(name: str) -> str:
    return f"a photo with a {name}"


def text_list(labels: torch.Tensor | np.ndarray, task: str, class_names: tuple[str, ...], num_slots: int):
    """The text list of one image: num_slots entries of the task's padding text; then, walking classes in
    dataset order, each GT mask overwrites the next slot with its class prompt until the slots run out."""
    texts = [TASK_PADDING_TEXT[task]] * num_slots
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    slot = 0
    for class_id in np.nonzero(counts)[0]:
        for _ in range(int(counts[class_id])):
            if slot >= num_slots:
                return texts
            texts[slot] = class_prompt(class_names[class_id])
            slot += 1
    return texts


class TextTokenTable:
    """Token rows of every distinct text a list can hold (K class texts + 3 padding texts), tokenized once,
    so building an image's [num_slots, 77] token block is a gather rather than BPE on every string."""

    def __init__(self, class_names: tuple[str, ...], num_slots: int):
        self.class_names = tuple(class_names)
        self.num_slots = num_slots
        self.class_tokens = tokenize([class_prompt(name) for name in self.class_names])
        self.padding_tokens = {task: tokenize([TASK_PADDING_TEXT[task]])[0] for task in TASKS}

    def tokens(self, labels: torch.Tensor, task: str) -> torch.Tensor:
        """int64 [num_slots, 77]: equal to tokenize(text_list(labels, task, ...))."""
        block = self.padding_tokens[task].expand(self.num_slots, -1).clone()
        ordered = torch.sort(torch.as_tensor(labels, dtype=torch.int64)).values[: self.num_slots]
        block[: len(ordered)] = self.class_tokens[ordered]
        return block
