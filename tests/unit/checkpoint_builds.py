"""Small builds for tests/unit/test_checkpoint_builder.py. They run in a ``spawn``-ed child process,
which imports this module: it stays light (torch only where a build needs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_pid(directory: Path, recipe: str = "") -> None:
    """A build: config.json says which process built it."""
    (directory / "config.json").write_text(json.dumps({"pid": os.getpid(), "recipe": recipe}))


def train_a_little(directory: Path) -> None:
    """A build that runs the real training loop (it seeds torch and sets its thread count) on a
    one-layer model for two steps."""
    import torch

    from vlm_checkpoints.train import train

    model = torch.nn.Linear(4, 1)
    batch = (torch.ones(8, 4), torch.zeros(8, 1))
    train(
        model,
        lambda pairs: batch,
        lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
        steps=2,
        batch_size=1,
        distinct_batches=1,
    )
    torch.set_num_threads(1)  # as a careless build might
    write_pid(directory)


def fail(directory: Path) -> None:
    (directory / "half-written").write_text("x")
    raise RuntimeError("the recipe is broken")


def wait_forever(directory: Path) -> None:
    """A build that says it started, then never ends (a long training run)."""
    import time

    (directory.parent / "started").write_text(str(os.getpid()))
    while True:
        time.sleep(1)
