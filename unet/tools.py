"""Command lines for the tools the pipeline starts (DVC, and the stages that call `unet` by name).

`unet` may run as `.venv/bin/unet` without the virtual environment on PATH, so `dvc` is
started through this interpreter, and children that call `unet` or `dvc` by name get this
interpreter's folder first on PATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def dvc_command(*args: str) -> list[str]:
    """Return a dvc command line that runs in this interpreter's environment, whatever PATH contains."""
    return [sys.executable, "-m", "dvc", *args]


def tool_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return `base` (default os.environ) with this interpreter's folder first on PATH."""
    environment = dict(os.environ if base is None else base)
    environment["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), environment.get("PATH")]))
    return environment
