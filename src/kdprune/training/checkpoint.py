"""Training checkpoints: written atomically, loaded with weights_only=True (no arbitrary unpickling)."""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdprune.utils.meta import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run being resumed."""


def capture_rng() -> dict[str, Any]:
    """Every RNG state a step may touch, as tensors/ints so weights_only loading accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states captured by `capture_rng`."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise `state` and replace `path` atomically, so a kill never leaves half a file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights_only: tensors and plain containers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (run without --resume)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which and what to do
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "delete it to start over") from None
