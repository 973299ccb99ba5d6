"""CIFAR staged once, and what a data folder holds: the ``resnet-exp-data`` command.

A machine without internet (a cluster node, a lent GPU machine) cannot download
CIFAR on first use. Download it once where there is internet, carry the folder,
and name it with ``RESNET_EXP_DATA`` (``data.root``'s default):

    resnet-exp-data download DIR                        # CIFAR-10 (--dataset cifar10 cifar100)
    resnet-exp-data check [DIR]                         # DIR, else $RESNET_EXP_DATA, else ./data

The layouts are the ones a run reads (``sources.find_cifar``): train/ + test/ class
folders, or torchvision's cifar-10-batches-py/ and cifar-100-python/. ``require``
is the check that a sweep, ``resnet-exp-reproduce`` and ``gpu_check.py --data`` run
before they schedule anything. Exit status: 0, or 2 with one line (offline, a folder
without the data set, a bad argument).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from resnet_exp.data.sources import (
    BATCHES,
    CIFAR,
    DATA_ENV,
    FOLDERS,
    download_cifar,
    find_cifar,
    list_images,
    missing_cifar,
    named_root,
    root_origin,
)
from resnet_exp.data.splits import check_same_classes
from resnet_exp.errors import UserError

PROBE_TIMEOUT_S = 15  # torchvision's own download waits on a silent network without limit


@dataclass
class Holding:
    """One CIFAR copy in a folder: its layout and its image counts per split."""

    name: str
    layout: str  # FOLDERS or BATCHES
    root: Path
    train: int
    test: int
    classes: int

    def line(self) -> str:
        where = (
            "train/ + test/ class folders"
            if self.layout == FOLDERS
            else f"torchvision's {CIFAR[self.name][1]}/"
        )
        return (
            f"{where}: {self.classes} classes, train {self.train:,} images, "
            f"test {self.test:,} images"
        )


def default_root() -> Path:
    """``data.root``'s default: $RESNET_EXP_DATA, else ./data (config.py)."""
    return Path(os.environ.get(DATA_ENV) or "data")


def count(name: str, root: Path) -> Holding | None:
    """CIFAR ``name`` in ``root`` with its counts; None when neither layout is there.
    A copy a run could not read raises UserError with the run's own message."""
    found = find_cifar(name, root)
    if found is None:
        return None
    layout, base = found
    if layout == FOLDERS:
        classes, train = list_images(base / "train")
        test_classes, test = list_images(base / "test")
        check_same_classes(classes, test_classes, base, "test", "classes")
        return Holding(name, layout, base, len(train), len(test), len(classes))
    import torchvision.datasets

    cls = getattr(torchvision.datasets, CIFAR[name][0])
    try:  # torchvision checks each file's MD5 before it unpickles it: only its own files load
        train, test = (cls(str(base), train=t, download=False) for t in (True, False))
    except RuntimeError as e:
        raise UserError(
            f"{CIFAR[name][2]} in {base / CIFAR[name][1]} is unreadable ({e}); "
            f"delete it and download again"
        ) from e
    return Holding(name, layout, base, len(train), len(test), len(train.classes))


def require(name: str, root: Path, download: bool) -> None:
    """What a sweep checks before it schedules a run: CIFAR ``name`` readable in ``root``,
    downloaded once here if allowed (not by each run at once), else UserError (one line)."""
    if name not in CIFAR:
        return  # other sources are checked by the run that loads them
    if count(name, root) is not None:
        return
    if not download:
        raise UserError(missing_cifar(name, root))
    try:
        fetch([name], root)
    except UserError as e:
        raise UserError(
            f"no {CIFAR[name][2]} in {named_root(root)} ({root_origin()}), and {e}"
        ) from e


def probe(url: str, root: Path) -> None:
    """Fail in one line, within PROBE_TIMEOUT_S, when ``url`` cannot be reached."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot reach {urlparse(url).netloc} ({reason}): no internet here? run "
            f"'resnet-exp-data download {root}' on a machine with internet, carry the folder "
            f"here and set {DATA_ENV} to it"
        ) from e


def fetch(names: list[str], root: Path) -> list[Holding]:
    """Download each of ``names`` not yet in ``root`` (torchvision checks and extracts
    it), drop the archive (the extracted copy is what runs read: half the size to carry)."""
    import torchvision.datasets

    held = []
    for name in names:
        holding = count(name, root)
        if holding is None:
            cls = getattr(torchvision.datasets, CIFAR[name][0])
            probe(cls.url, root)
            download_cifar(name, root)
            (root / cls.filename).unlink(missing_ok=True)
            holding = count(name, root)
            assert holding is not None, f"{name} downloaded but not found in {root}"
        held.append(holding)
    return held


def size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def check(root: Path, names: list[str]) -> list[Holding]:
    """The CIFAR copies in ``root`` (``names``: those that must be there)."""
    held: list[Holding] = []
    for name in CIFAR:
        folders = next((h for h in held if h.layout == FOLDERS), None)
        if folders is not None and find_cifar(name, root) == (FOLDERS, folders.root):
            held.append(replace(folders, name=name))  # the same class folders, counted once
        elif (holding := count(name, root)) is not None:
            held.append(holding)
    for name in names:
        if not any(h.name == name for h in held):
            raise UserError(missing_cifar(name, root))
    if not held:
        raise UserError(
            f"no CIFAR in {root} (expected cifar-10-batches-py/, cifar-100-python/ or "
            f"train/ + test/ class folders); stage it on a machine with internet: "
            f"resnet-exp-data download {root}"
        )
    return held


def report(root: Path, held: list[Holding]) -> None:
    origin = f" ({DATA_ENV})" if os.environ.get(DATA_ENV) and root == default_root() else ""
    print(f"resnet-exp-data: {root.resolve()}{origin}, {size_mb(root):,.0f} MB")
    lines = {h.line() for h in held if h.layout == FOLDERS}  # folders serve either name
    for line in sorted(lines):
        print(f"  dataset=cifar10 or cifar100 reads {line}")
    for h in held:
        if h.layout == BATCHES:
            print(f"  dataset={h.name} reads {h.line()}")
    print(f"resnet-exp-data: runs read it with {DATA_ENV}={root.resolve()} (or data.root=...)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="resnet-exp-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True)
    down = sub.add_parser("download", help="download CIFAR with torchvision (needs internet)")
    look = sub.add_parser("check", help="what a folder holds, per split")
    for q, what in ((down, "into"), (look, "to check")):
        q.add_argument(
            "dir",
            nargs="?",
            type=Path,
            help=f"the folder {what} (default: ${DATA_ENV}, else ./data)",
        )
    down.add_argument("--dataset", nargs="+", choices=sorted(CIFAR), default=["cifar10"])
    look.add_argument(
        "--dataset",
        nargs="+",
        choices=sorted(CIFAR),
        default=[],
        help="those that must be there (exit 2 otherwise)",
    )
    args = p.parse_args(argv)
    args.dir = args.dir or default_root()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.action == "download":
            held = fetch(list(dict.fromkeys(args.dataset)), args.dir)
        else:
            held = check(args.dir, args.dataset)
    except UserError as e:
        print(f"resnet-exp-data: error: {e}", file=sys.stderr)
        return 2
    report(args.dir, held)
    return 0


def entry() -> None:
    """The ``resnet-exp-data`` command."""
    sys.exit(main())
