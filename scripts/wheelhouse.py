#!/usr/bin/env python
"""The offline kit: every wheel resnet-exp needs, for one Python on linux x86-64, in one
folder that a machine without a package index installs from (``make install WHEELS=DIR``).

    python scripts/wheelhouse.py --out wheelhouse --python 3.12       # make wheelhouse PY=3.12
    python scripts/wheelhouse.py --out wheelhouse --python 3.12 --torch   # torch too (GBs)

It holds the tool's own wheel (``pip install resnet-exp`` needs no source tree), its
dependencies, antlr4-python3-runtime 4.9.3 (omegaconf's and Hydra's parser; PyPI has
only its source, so its wheel is built here: it is pure Python) and pytest (the
tests ``make gpu-check`` runs). Without ``--torch`` it leaves out torch, torchvision
and what they themselves require (numpy, pillow, typing-extensions, ...): a machine
with torch and torchvision installed has those. Run it where there is a package
index; it prints the folder's size.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANTLR = "antlr4-python3-runtime==4.9.3"
EXTRA = ["pytest"]  # make gpu-check runs the CUDA-only tests with it
# What torch and torchvision require themselves (torch 2.4 to 2.14, torchvision 0.19 to
# 0.29): present wherever they are installed. Left out without --torch.
TORCH_BRINGS = {
    "torch", "torchvision", "numpy", "pillow", "filelock", "typing-extensions", "sympy",
    "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "setuptools", "triton",
}  # fmt: skip
TORCH_PREFIXES = ("nvidia-", "cuda-")  # the CUDA libraries of torch's Linux wheels


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"wheelhouse: error: pip {args[0]} failed (above)")


def platforms(glibc: str) -> list[str]:
    """manylinux tags up to glibc ``glibc`` (pip does not widen manylinux_2_X itself)."""
    top = int(glibc.split(".")[1])
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(top, 4, -1)]
    legacy = {17: "manylinux2014_x86_64", 12: "manylinux2010_x86_64", 5: "manylinux1_x86_64"}
    return tags + [tag for minor, tag in legacy.items() if minor <= top]


def requirements(wheel: Path, torch: bool) -> list[str]:
    """The tool wheel's own Requires-Dist (its extras' left out), as pip reads them."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    if not torch:
        reqs = [r for r in reqs if canonical(re.split(r"[<>=!~ ;\[]", r)[0]) not in TORCH_BRINGS]
    return reqs + EXTRA


def build(out: Path, python: str, torch: bool, glibc: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # only this build's tool wheel, not an older one
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", tmp, str(REPO))
        wheel = next(Path(tmp).glob("resnet_exp-*.whl"))
        for old in out.glob("resnet_exp-*.whl"):
            old.unlink()
        target = out / wheel.name
        wheel.replace(target)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), ANTLR)
    abi = "cp" + python.replace(".", "")
    tags = [a for tag in platforms(glibc) for a in ("--platform", tag)]
    pip(
        "download", "--quiet", "--dest", str(out), "--find-links", str(out),
        "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        "--abi", abi, "--abi", "abi3", "--abi", "none", *tags,
        *requirements(target, torch),
    )  # fmt: skip
    if not torch:  # also what the other dependencies pulled in (matplotlib: numpy, pillow)
        for whl in out.glob("*.whl"):
            name = canonical(whl.name.split("-")[0])
            if name in TORCH_BRINGS or name.startswith(TORCH_PREFIXES):
                whl.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    p.add_argument("--out", type=Path, default=Path("wheelhouse"), help="the folder")
    p.add_argument("--python", default=here, help=f"the Python it is for (default {here})")
    p.add_argument("--torch", action="store_true", help="torch and torchvision too (GBs)")
    p.add_argument("--glibc", default="2.28", help="the oldest glibc it runs on (default 2.28)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        p.error(f"--python {args.python!r} must be a version like 3.12")
    if not re.fullmatch(r"2\.\d+", args.glibc) or int(args.glibc.split(".")[1]) < 5:
        p.error(f"--glibc {args.glibc!r} must be a version like 2.28 (at least 2.5)")
    build(args.out, args.python, args.torch, args.glibc)
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MB  {w.name}")
    print(
        f"wheelhouse: {len(wheels)} wheels, {size:.1f} MB in {args.out} (Python {args.python}, "
        f"linux x86-64{', torch included' if args.torch else ', without torch'}); "
        f"install with: make install WHEELS={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
