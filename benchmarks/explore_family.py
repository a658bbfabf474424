"""Time ``eft-local explore`` on quantized variants of the bundled family.

    python benchmarks/explore_family.py [--out DIR] [--plot FILE.png]

Writes the variants with ``eft-local quantize`` (large_base: the shipped Q8_0 and Q4_K_M;
small_ft and small_base: the shipped f32 and Q8_0; 2 x 2 x 2 = 8 combinations), then runs
``eft-local explore`` over them on the bundled held-out text (about 2,000 tokens) with an
empty reference cache, then once more with the cache filled, and prints both wall times.
Only the public command line is used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eft_local.presets import FAMILY_DIR

VARIANTS = {"large_base": ["Q8_0", "Q4_K_M"], "small_ft": ["F32", "Q8_0"],
            "small_base": ["F32", "Q8_0"]}
SHIPPED = {"large_base": "Q8_0", "small_ft": "F32", "small_base": "F32"}


def eft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eft_local", *args], check=True,
                          capture_output=True, text=True)


def make_variants(out: Path) -> list[str]:
    """Variant files named ROLE.TYPE.gguf (the shipped type is a copy); -m options."""
    models = []
    for role, kinds in VARIANTS.items():
        for kind in kinds:
            path = out / f"{role}.{kind}.gguf"
            if not path.exists():
                if kind == SHIPPED[role]:
                    shutil.copyfile(FAMILY_DIR / f"{role}.gguf", path)
                else:
                    eft("quantize", str(FAMILY_DIR / f"{role}.gguf"), str(path), kind,
                        "--allow-requantize")
        models += ["-m", f"{role}={out}/{role}.*.gguf"]
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the variants (default: temporary)")
    parser.add_argument("--plot", help="also write the plot to this .png/.svg file")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="eft-explore-"))
    out.mkdir(parents=True, exist_ok=True)
    models = make_variants(out)
    cache = Path(tempfile.mkdtemp(prefix="eft-explore-cache-"))
    command = ["explore", *models, "--cache-dir", str(cache)]
    if args.plot:
        command += ["--plot", args.plot]
    print("$ eft-local " + " ".join(command).replace(str(out), "variants")
          .replace(str(cache), "CACHE"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for label in ("empty cache", "cache filled"):
        start = time.perf_counter()
        result = eft(*command)
        seconds = time.perf_counter() - start
        print(f"{label}: {seconds:.1f} s")
    print(result.stdout)


if __name__ == "__main__":
    main()
