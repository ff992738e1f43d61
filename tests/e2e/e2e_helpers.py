"""Shared by the end-to-end tests: one small, CI-sized compile of the bundled default model."""
from pathlib import Path

from qcompile.cli import main

# 16 x 256 calibration tokens and 8 x 256 evaluation tokens: enough to separate a working format from a
# broken one on this model, small enough for CI's two cores.
SMALL_RUN = ["--calib-samples", "16", "--seq-len", "256", "--eval-samples", "8", "--eval-seq-len", "256", "-q"]


def compile_default_model(out: Path, fmt: str) -> Path:
    """Compile smollm2-135m with ``fmt`` into ``out`` through the CLI (as a user would) and return ``out``."""
    assert main(["compile", "smollm2-135m", "-f", fmt, "-o", str(out), *SMALL_RUN]) == 0
    return out
