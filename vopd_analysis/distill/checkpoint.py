"""Checkpoints that make a resumed run identical to an uninterrupted one.

Layout of ``<out>/checkpoints/step-00000010/``:

* ``model/``          the student (``save_pretrained``, float32) and its tokenizer;
* ``state.pt``        optimizer, scheduler, step, and every metrics row written so far;
* ``rng-rank{r}.pt``  torch / numpy / python RNG states of process r;
* ``manifest.json``   the size and sha256 of every other file, written last.

A checkpoint is written into ``step-XXXXXXXX.tmp`` and renamed when complete, so an
interruption mid-save never leaves a half-written checkpoint that resume would pick up.
Resume (``choose``) verifies the newest checkpoint against its manifest and falls back to
the newest intact one, naming each bad file with its expected and actual size or hash; a
checkpoint without a manifest (written before manifests existed) is loaded unverified, and
a file in it that cannot be read is an ``InputError`` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import records
from ..errors import InputError

MANIFEST = "manifest.json"
_NAME = re.compile(r"step-\d{8}")

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
      The ``<out_dir>/checkpoints/step-XXXXXXXX`` folders that hold ``state.pt`` (not ``.tmp``
      ones being written, nor ``.corrupt`` ones set aside), sorted by name (zero-padded step, so
      by step); [] if there are none.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and _NAME.fullmatch(p.name)
                  and (p / "state.pt").is_file())


def latest(out_dir) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``out_dir``, or None."""
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


# ----------------------------------------------------------------------------- integrity

def file_digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex digest} of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return {"size": Path(path).stat().st_size, "sha256": sha.hexdigest()}


def write_manifest(folder: Path, step: int) -> Path:
    """Record the size and sha256 of every file under ``folder`` in ``folder/manifest.json``.

    Written through a temporary file and ``os.replace``, after every other file, so a manifest
    that exists is complete.

    Args:
      folder: a checkpoint folder (being written).
      step: its step, recorded too.
    Returns:
      The manifest's path.
    """
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_digest(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(MANIFEST)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify(path: Path, required=()) -> Optional[List[str]]:
    """Check a checkpoint against its manifest.

    Args:
      path: a checkpoint folder.
      required: files a checkpoint without a manifest must hold (a Trainer checkpoint's rows: without
        them the save did not finish).
    Returns:
      None if it has no manifest (unverifiable) and holds every ``required`` file; else one line per
      bad file ("state.pt: 1,024 bytes, expected 2,048"), [] when every file is intact.
    """
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        missing = [f"{name}: missing, and no {MANIFEST} (the save did not finish)" for name in required
                   if not (Path(path) / name).is_file()]
        return missing or None
    try:
        files = records.read_record(manifest, "manifest", {"files": dict}, required=("files",))["files"]
        records.check_fields(files, f"{manifest}: files", dict.fromkeys(files, dict))
        for name, want in files.items():
            records.check_fields(want, f"{manifest}: files: {name}", {"size": int, "sha256": str},
                                 required=("size", "sha256"))
    except InputError as err:
        return [f"{MANIFEST}: unreadable ({err})"]
    problems = []
    for name, want in files.items():
        file = Path(path) / name
        if not file.is_file():
            problems.append(f"{name}: missing, expected {want['size']:,} bytes")
            continue
        got = file_digest(file)
        if got["size"] != want["size"]:
            problems.append(f"{name}: {got['size']:,} bytes, expected {want['size']:,}")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{name}: sha256 {got['sha256']}, expected {want['sha256']}")
    return problems


@dataclasses.dataclass
class Choice:
    """The checkpoint a resume starts from (``choose``).

    ``path``: the newest intact (or unverified) checkpoint, None if the run has none;
    ``bad``: (checkpoint, its problems) for each newer one that failed verification;
    ``verified``: whether ``path`` was checked against a manifest.
    """

    path: Optional[Path]
    bad: List[Tuple[Path, List[str]]]
    verified: bool


def choose(out_dir, dirs: Optional[List[Path]] = None, required=()) -> Choice:
    """The newest checkpoint of ``out_dir`` that passes ``verify`` (or has no manifest), newest first.

    Args:
      out_dir: the run folder.
      dirs: its checkpoints, oldest first (default ``checkpoint_dirs(out_dir)``; the TRL engine's
        ``checkpoint-N`` folders).
      required: passed to ``verify``.
    Returns:
      A ``Choice``; an ``InputError`` naming every bad file if the run has checkpoints but none
      is intact (resuming from scratch would silently rewrite its metrics).
    """
    dirs, bad = checkpoint_dirs(out_dir) if dirs is None else dirs, []
    for path in reversed(dirs):
        problems = verify(path, required)
        if not problems:
            return Choice(path, bad, problems is not None)
        bad.append((path, problems))
    if bad:
        raise InputError(f"cannot resume {out_dir}: no intact checkpoint; " + "; ".join(
            f"{p.name}: {', '.join(problems)}" for p, problems in bad)
            + ". Start the run again with another --out (or delete this folder)")
    return Choice(None, [], False)


def step_of(path) -> int:
    """The step of a checkpoint folder: ``step-00000020`` (this loop's) or ``checkpoint-20`` (a Trainer's) -> 20."""
    return int(re.fullmatch(r"(?:step|checkpoint)-(\d+)", Path(path).name).group(1))


def set_aside(path: Path) -> Path:
    """Rename a bad checkpoint to ``step-XXXXXXXX.corrupt`` (``-2``, ``-3`` ... if taken), out of
    the way of resume and pruning; return the new path."""
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.replace(path, target)
    return target


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide Hugging Face's progress bars (``save_pretrained``'s "Writing model shards") for the
    duration, so they do not break the training loop's tqdm line; restores them afterwards."""
    from transformers.utils import logging as tf_logging
    was_on = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()        # also Hugging Face Hub's bars
    try:
        yield
    finally:
        if was_on:
            with warnings.catch_warnings():   # HF_HUB_DISABLE_PROGRESS_BARS=1 makes enabling warn
                warnings.simplefilter("ignore")
                tf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- save and load

def save(accelerator, out_dir, step: int, model, tokenizer, optimizer, scheduler, rows: list,
         keep: int = 2) -> Path:
    """Write checkpoint ``step``; every process must call this (it waits for the others).

    Each process writes its own ``rng-rank{r}.pt``; the main process writes ``model/`` and
    ``state.pt`` (step, optimizer and scheduler state, ``rows``, world size) into
    ``step-XXXXXXXX.tmp``, then ``manifest.json`` (``write_manifest``), renames the folder
    when complete and deletes all but the newest ``keep``.

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
    try:
        with disk_full_is_input_error(out_dir, f"checkpoint {final.name}"):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
            if accelerator.is_main_process:
                with quiet_hf_progress():
                    model.save_pretrained(tmp / "model")
                    tokenizer.save_pretrained(tmp / "model")
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rows": rows, "world_size": accelerator.num_processes}, tmp / "state.pt")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_manifest(tmp, step)
    except BaseException:
        if accelerator.is_main_process:       # a half-written checkpoint holds space and is never read
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 64 * 2**20     # bytes free below which torch's "file write failed" is taken for a full disk


def disk_full(err: BaseException, folder) -> bool:
    """Whether an error raised while writing under ``folder`` is the disk running out of space: an
    ``OSError`` ENOSPC or EDQUOT (or one as the cause of another error), or torch's serialisation error
    ("PytorchStreamWriter failed writing file ...: file write failed", which does not say why) with
    less than ``LOW_SPACE`` bytes left there."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
    return isinstance(err, RuntimeError) and "write failed" in str(err) and free_bytes(folder) < LOW_SPACE


def free_bytes(folder) -> int:
    """Bytes free for this user on the filesystem of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def disk_full_is_input_error(out_dir, what: str):
    """A full disk while writing ``what`` into the run folder ``out_dir`` (``disk_full``) becomes one
    ``InputError`` line naming the folder and how to continue once there is room; other errors pass."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not disk_full(err, out_dir):
            raise
        raise InputError(f"the disk is full: cannot write {what} into {out_dir} ({first_line(err)}; "
                         f"{free_bytes(out_dir) / 2**20:,.0f} MiB free there); free some space, then continue "
                         f"with: vopd distill --out {out_dir} --resume") from None


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
    state = read_file(Path(path) / "state.pt")
    if state["world_size"] != accelerator.num_processes:
        raise InputError(f"checkpoint {path} was written by {state['world_size']} processes; resume it with "
                         f"the same number (got {accelerator.num_processes})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(read_file(Path(path) / f"rng-rank{accelerator.process_index}.pt"))
    return state


def read_file(path: Path):
    """``torch.load`` of one checkpoint file; a missing, truncated or otherwise unreadable file is an
    ``InputError`` naming it (with its size), not a bare unpickling traceback.

    Args:
      path: ``state.pt`` or ``rng-rank{r}.pt`` of a checkpoint.
    Returns:
      The loaded object.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, weights_only=False)
    except Exception as err:   # truncation shows up as RuntimeError, EOFError or UnpicklingError
        raise InputError(f"checkpoint file {path} ({path.stat().st_size:,} bytes) cannot be read ({first_line(err)}); "
                         f"move its checkpoint folder {path.parent} aside to resume from an older one") from None


def first_line(err: BaseException, width: int = 100) -> str:
    """"Type: message" of an exception, its first line cut to ``width`` characters (for one-line errors)."""
    text = str(err).splitlines()[0] if str(err) else ""
    text = text if len(text) <= width else text[:width] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
