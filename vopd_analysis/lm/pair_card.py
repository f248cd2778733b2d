"""The sha256 card of a committed student/teacher pair (``vopd_analysis/lm/pairs/<preset>``).

A pair folder holds the files a preset loads (``teacher/``, ``student/``, anything else it
was trained from) and ``card.json``: how it was trained, its quality numbers and the sha256
of every other file. The card is written last, so a folder with a card is complete;
``verify_pair`` checks every file it lists before a preset loads the pair, because a
retrained pair (different float round-off on another machine) changes every real-model
number downstream. ``CommittedPair`` is what a preset module (``vopd_analysis.lm.tiny``,
``vopd_analysis.lm.small``) builds its ``load_or_train_pair`` and ``python -m`` command from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .. import records
from ..errors import InputError

CARD = "card.json"


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks.

    Args:
      path: the file.

    Returns:
      The digest as 64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_files(root) -> dict:
    """The sha256 of every file under ``root`` (recursively) except any named ``card.json``.

    Args:
      root: the pair folder.

    Returns:
      {path relative to ``root`` with ``/`` separators: hex sha256}, sorted by path.
    """
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != CARD}


def write_card(root, card: dict) -> dict:
    """Write ``root/card.json``: ``card`` with ``card["files"] = pair_files(root)``.

    Call it after every other file of the pair is written: a folder with a card is complete.

    Args:
      root: the pair folder.
      card: JSON-serialisable description of the pair; updated in place.

    Returns:
      The same ``card``, with its ``"files"`` entry.
    """
    card["files"] = pair_files(root)
    (Path(root) / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def verify_pair(root, preset: str, module: str) -> dict:
    """The card of the ``preset`` pair in ``root``, after checking every file it lists against its sha256.

    A missing card, a card that is not JSON or lacks its ``files`` (``records``), a missing file or a
    file whose bytes changed raises ``InputError`` naming the file (and field, or the hash the card
    expects); ``module`` (``python -m module --retrain``)
    is how the message says to retrain. Files under ``root`` that the card does not list
    are not checked.

    Args:
      root: the pair folder.
      preset: the preset's name, for messages (``"tiny"``).
      module: the preset module, for messages (``"vopd_analysis.lm.tiny"``).

    Returns:
      The parsed ``card.json`` (a dict).
    """
    root = Path(root)
    card_path = root / CARD
    retrain = f"python -m {module} --retrain"
    if not card_path.is_file():
        raise InputError(f"{preset} pair card {card_path} is missing; restore it with git or retrain the pair "
                         f"({retrain})")
    card = records.read_record(card_path, f"{preset} pair card", {"files": dict}, required=("files",))
    records.check_fields(card["files"], f"{card_path}: files", dict.fromkeys(card["files"], str))
    for rel, expected in card["files"].items():
        path = root / rel
        if not path.is_file():
            raise InputError(f"{preset} pair file {path} is missing (expected sha256 {expected})")
        actual = file_sha256(path)
        if actual != expected:
            raise InputError(f"{preset} pair file {path} has sha256 {actual}, expected {expected}: it was modified; "
                             f"restore it with git checkout or retrain ({retrain})")
    return card


def differences(card: dict, reference: dict, metrics: Dict[str, str]) -> list:
    """What differs between two pair cards, as human-readable lines.

    Args:
      card: a card (e.g. of a retrained pair).
      reference: the card to compare with (e.g. the committed one).
      metrics: {key in card["teacher"] and card["student"]: its name in the message}.

    Returns:
      One line per differing metric (``"teacher held-out cross-entropy 5.22 vs 5.23"``) and per
      file of ``card`` whose hash differs from or is missing in ``reference``; empty when
      identical.
    """
    out = [f"{role} {name} {card[role][key]} vs {reference[role][key]}"
           for key, name in metrics.items() for role in ("teacher", "student")
           if card[role][key] != reference[role][key]]
    out += [f"{rel} differs" for rel, h in card["files"].items() if reference["files"].get(rel) != h]
    return out


@dataclasses.dataclass(frozen=True)
class CommittedPair:
    """A preset's committed pair: where it lives, how to retrain it, and which card numbers compare two pairs.

    Attributes:
      preset: the preset's name (``"tiny"``).
      module: the preset module (``python -m module --retrain``).
      committed: the folder every machine loads (``vopd_analysis/lm/pairs/<preset>``).
      cache_dir: default parent folder of retrained pairs.
      metrics: {card key of the teacher's and student's quality number: its name}.
    """

    preset: str                 # "tiny"
    module: str                 # "vopd_analysis.lm.tiny": python -m module --retrain
    committed: Path             # the folder every machine loads
    cache_dir: str              # default parent of retrained pairs
    metrics: Dict[str, str]     # card key of the teacher's and student's quality number -> its name

    def verify(self, root=None) -> dict:
        """``verify_pair`` on ``root`` (default: the committed folder); returns the card."""
        return verify_pair(self.committed if root is None else root, self.preset, self.module)

    def differences(self, card: dict, reference: dict) -> list:
        """``differences`` of two cards on this preset's ``metrics`` and file hashes."""
        return differences(card, reference, self.metrics)

    def load_or_train(self, root, train: Callable[[Path], dict], default: bool, retrain: bool,
                      verbose: bool) -> Tuple[Path, dict]:
        """The pair a preset loads: the committed one, or one trained (once) into ``root``.

        Args:
          root: where a retrained or non-default pair lives; a folder that already has a card is
            loaded (after ``verify``) instead of trained again.
          train: ``train(root) -> card``, writing the pair into ``root``.
          default: whether the preset's config is the default one (the committed pair's).
          retrain: train even for the default config.
          verbose: print whether a freshly retrained default pair differs from the committed one.

        Returns:
          (folder, card): the committed folder if ``default`` and not ``retrain``, else ``root``.
        """
        if not retrain and default:
            return self.committed, self.verify()
        root = Path(root)
        if (root / CARD).is_file():
            return root, self.verify(root)
        card = train(root)
        if default and verbose:
            diff = self.differences(card, self.verify())
            print(f"{self.preset} pair: retrained pair is identical to the committed one" if not diff else
                  f"{self.preset} pair: retrained pair DIFFERS from the committed one: " + "; ".join(diff))
        return root, card

    def main(self, argv: Optional[list], description: str, train: Callable[[Path], dict],
             retrain_default: Callable[[], object]) -> int:
        """``python -m module [--retrain] [--out DIR]``: check the committed pair, or retrain it.

        Without ``--retrain``: ``verify`` the committed pair and print how many files match. With
        ``--retrain --out DIR``: ``train(DIR)`` (refused if DIR already holds a card), then print
        whether the result differs from the committed pair. With ``--retrain`` alone:
        ``retrain_default()`` (into the cache).

        Args:
          argv: the arguments (None: ``sys.argv[1:]``).
          description: the ``--help`` text.
          train: ``train(folder) -> card``.
          retrain_default: retrains the default pair into the cache.

        Returns:
          0 (bad input raises ``InputError``).
        """
        import argparse
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--retrain", action="store_true", help="train the pair from scratch (minutes on 2 cores)")
        parser.add_argument("--out", help=f"with --retrain: folder for the new pair (default {self.cache_dir}/<hash>)")
        args = parser.parse_args(argv)
        if not args.retrain:
            card = self.verify()
            print(f"committed {self.preset} pair {self.committed}: {len(card['files'])} files match their sha256")
            return 0
        if args.out:
            if (Path(args.out) / CARD).exists():
                raise InputError(f"{args.out} already holds a pair; choose another --out")
            card = train(Path(args.out))
            if (self.committed / CARD).is_file() and Path(args.out).resolve() != self.committed:
                diff = self.differences(card, self.verify())
                print("identical to the committed pair" if not diff else
                      "differs from the committed pair: " + "; ".join(diff))
            return 0
        retrain_default()
        return 0
