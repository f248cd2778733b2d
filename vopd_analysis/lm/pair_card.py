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

from ..errors import InputError

CARD = "card.json"


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_files(root) -> dict:
    """{relative path: sha256} of every file of the pair under ``root`` except the card."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != CARD}


def write_card(root, card: dict) -> dict:
    """Add the sha256 of every file under ``root`` to ``card`` and write it as ``root/card.json``."""
    card["files"] = pair_files(root)
    (Path(root) / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def verify_pair(root, preset: str, module: str) -> dict:
    """The card of the ``preset`` pair in ``root``, after checking every file it lists against its sha256.

    A missing card, a missing file or a file whose bytes changed raises ``InputError``
    naming the file and the hash the card expects; ``module`` (``python -m module --retrain``)
    is how the message says to retrain.
    """
    root = Path(root)
    card_path = root / CARD
    retrain = f"python -m {module} --retrain"
    if not card_path.is_file():
        raise InputError(f"{preset} pair card {card_path} is missing; restore it with git or retrain the pair "
                         f"({retrain})")
    card = json.loads(card_path.read_text())
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
    """What differs between two pair cards: the teacher's and student's ``metrics`` ({card key: what
    to call it}) and the file hashes (empty when identical)."""
    out = [f"{role} {name} {card[role][key]} vs {reference[role][key]}"
           for key, name in metrics.items() for role in ("teacher", "student")
           if card[role][key] != reference[role][key]]
    out += [f"{rel} differs" for rel, h in card["files"].items() if reference["files"].get(rel) != h]
    return out


@dataclasses.dataclass(frozen=True)
class CommittedPair:
    """A preset's committed pair: where it lives, how to retrain it, and which card numbers compare two pairs."""

    preset: str                 # "tiny"
    module: str                 # "vopd_analysis.lm.tiny": python -m module --retrain
    committed: Path             # the folder every machine loads
    cache_dir: str              # default parent of retrained pairs
    metrics: Dict[str, str]     # card key of the teacher's and student's quality number -> its name

    def verify(self, root=None) -> dict:
        return verify_pair(self.committed if root is None else root, self.preset, self.module)

    def differences(self, card: dict, reference: dict) -> list:
        return differences(card, reference, self.metrics)

    def load_or_train(self, root, train: Callable[[Path], dict], default: bool, retrain: bool,
                      verbose: bool) -> Tuple[Path, dict]:
        """(folder, card): the committed pair (checked) if neither ``retrain`` nor a config other than the
        ``default``; else the pair in ``root``, trained by ``train(root)`` unless it already has a card. A
        retrained default pair is compared with the committed one (printed if ``verbose``)."""
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
        """``python -m module [--retrain] [--out DIR]``: check the committed pair, or retrain it (into
        ``--out`` with ``train``, else into the cache with ``retrain_default``)."""
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
