#!/usr/bin/env python
"""Fuzz the native op library (qcompile/fuzz/): seeded, time-bounded mutations of valid FP4MatMul, SpQRMatMul
and CodebookMatMul inputs, each run in onnxruntime in a worker subprocess against the sanitizer build, each
answer checked against the numpy reference.

    python tools/fuzz_ops.py --seconds 1800 --seed 7    # long run: prints cases, clean errors, equal outputs, failures
    python tools/fuzz_ops.py --case-seed 30064771085      # replay one case (the seed a failure report names)
    python tools/fuzz_ops.py --build normal --seconds 60  # the normal (-O3) library instead

Exit status 1 when any case failed; failing cases are saved under build/fuzz-failures/<case seed>/.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.fuzz.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
