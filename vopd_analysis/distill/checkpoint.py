"""Checkpoints that make a resumed run identical to an uninterrupted one.

Layout of ``<out>/checkpoints/step-00000010/``:

* ``model/``          the student (``save_pretrained``, float32) and its tokenizer;
* ``state.pt``        optimizer, scheduler, step, and every metrics row written so far;
* ``rng-rank{r}.pt``  torch / numpy / python RNG states of process r.

A checkpoint is written into ``step-XXXXXXXX.tmp`` and renamed when complete, so an
interruption mid-save never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..errors import InputError


def rng_state() -> dict:
    """This process's RNG states: {"torch", "numpy", "python"} and, when CUDA is available, "cuda" (all devices)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states saved by ``rng_state`` (the CUDA ones only if saved and CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out_dir) -> List[Path]:
    """The complete checkpoints of a run, oldest first.

    Args:
      out_dir: the run folder.

    Returns:
      The ``<out_dir>/checkpoints/step-*`` folders that hold ``state.pt`` and are not ``.tmp``,
      sorted by name (zero-padded step, so by step); [] if there are none.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "state.pt").is_file())


def latest(out_dir) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``out_dir``, or None."""
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def save(accelerator, out_dir, step: int, model, tokenizer, optimizer, scheduler, rows: list,
         keep: int = 2) -> Path:
    """Write checkpoint ``step``; every process must call this (it waits for the others).

    Each process writes its own ``rng-rank{r}.pt``; the main process writes ``model/`` and
    ``state.pt`` (step, optimizer and scheduler state, ``rows``, world size) into
    ``step-XXXXXXXX.tmp``, renames it when complete and deletes all but the newest ``keep``.

    Args:
      accelerator: the ``accelerate.Accelerator`` of the run.
      out_dir: the run folder.
      step: the number of optimizer steps done.
      model: the student, saved with ``save_pretrained``; a non-finite parameter
        raises ``RuntimeError`` before anything is written.
      tokenizer: saved next to the model.
      optimizer, scheduler: their ``state_dict`` is saved.
      rows: every metrics row written so far.
      keep: how many checkpoints to keep (<= 0: keep all).

    Returns:
      The checkpoint folder ``<out_dir>/checkpoints/step-XXXXXXXX``.
    """
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise RuntimeError(f"refusing to checkpoint step {step}: the student has non-finite parameters")
    final = Path(out_dir) / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rows": rows, "world_size": accelerator.num_processes}, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator, path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and this process's RNG from checkpoint ``path``.

    The model weights are not loaded here (the caller loads ``path/model``).

    Args:
      accelerator: the ``accelerate.Accelerator``; its number of processes must equal the one
        that wrote the checkpoint (else ``InputError``).
      path: a checkpoint folder from ``checkpoint_dirs``.
      optimizer, scheduler: loaded in place.

    Returns:
      The saved state dict: ``step``, ``rows``, ``optimizer``, ``scheduler``, ``world_size``.
    """
    state = torch.load(Path(path) / "state.pt", weights_only=False)
    if state["world_size"] != accelerator.num_processes:
        raise InputError(f"checkpoint {path} was written by {state['world_size']} processes; resume it with "
                         f"the same number (got {accelerator.num_processes})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(Path(path) / f"rng-rank{accelerator.process_index}.pt", weights_only=False))
    return state
