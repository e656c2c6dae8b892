"""Refresh the checkpoints shipped with the package: ``python -m vlm_checkpoints.ship`` (``make ship``).

A shipped checkpoint is built by the same code, in the same child process, as a cached one
(``vlm-service build``), then copied with its ``build-inputs.json`` into ``vlm_checkpoints/shipped/<name>/``.
The builder uses it only while its key is the one the code gives (see builder.py); the test suite
fails while a shipped copy is stale, and says to run this.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vlm_service.config import load_settings

from .builder import SHIPPED_DIR, fresh_builds
from .tiny_moondream import ensure_tiny_moondream
from .tiny_qwen2_vl import ensure_tiny_qwen2_vl
from .tiny_smolvlm import ensure_tiny_smolvlm

#: What is shipped: the tiny checkpoints, so a fresh install serves them in seconds (the default model,
#: and the two that ground, whose training takes about 12 minutes on 2 cores).
SHIPPED = {
    "tiny-smolvlm": ensure_tiny_smolvlm,
    "tiny-qwen2-vl": ensure_tiny_qwen2_vl,
    "tiny-moondream": ensure_tiny_moondream,
}


def ship(name: str, cache_dir: Path) -> Path:
    """Build ``name`` from the code (or take that build from ``cache_dir``) and make it the shipped copy."""
    with fresh_builds():
        built = SHIPPED[name](cache_dir)
    target = SHIPPED_DIR / name
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=SHIPPED_DIR))
    try:
        shutil.copytree(built, staging, dirs_exist_ok=True)
        if target.exists():
            old = target.with_name(f".{name}-old")
            os.rename(target, old)
            shutil.rmtree(old)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_checkpoints.ship", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=list(SHIPPED), help=f"default: {', '.join(SHIPPED)}")
    parser.add_argument("--cache-dir", type=Path, help="where the build is cached (default: the server's --cache-dir)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or load_settings().cache_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in args.names:
        if name not in SHIPPED:
            parser.error(f"{name!r} is not shipped; shipped are {', '.join(SHIPPED)}")
        target = ship(name, cache_dir)
        size = sum(path.stat().st_size for path in target.iterdir())
        print(f"{name}: {target} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
