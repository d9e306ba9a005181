"""Where the real data for tests and benchmarks live: DeiT-Tiny weights and CIFAR-10 as JPEGs.

``LPT_DATA_DIR`` names the folder; without it, ``shared/data`` beside the repository (the CI layout). The
product never needs these files: users load weights from timm's hub or their own files.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LPT_DATA_DIR") or REPO.parent / "shared" / "data")
DEIT_TINY = "deit_tiny_patch16_224"
DEIT_WEIGHTS = DATA_DIR / f"{DEIT_TINY}.in1k.safetensors"
CIFAR_ZIP = DATA_DIR / "cifar10-jpg.zip"


def missing(*paths: Path) -> str | None:
    """A skip reason naming what is missing and how to provide it, or ``None`` when every path exists."""
    absent = [p.name for p in paths if not p.is_file()]
    if not absent:
        return None
    return (
        f"real data not found: {', '.join(absent)} in {DATA_DIR}; set LPT_DATA_DIR to a folder holding "
        f"{DEIT_WEIGHTS.name} (timm DeiT-Tiny ImageNet-1k weights) and {CIFAR_ZIP.name} (CIFAR-10 as JPEGs: "
        "train/<class>/*.jpg, test/<class>/*.jpg)"
    )
