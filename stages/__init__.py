"""Pipeline stages: one module per stage of dvc.yaml, each runnable as ``python -m stages.X``.

Importing the package, before torch, tells OpenMP's idle threads to spin only briefly (unless
the user chose a policy): spinning, they take the cores another job on the machine needs
(docs/speed.md has the figures).
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # GNU OpenMP (Linux wheels of torch): spin iterations
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # LLVM and Intel OpenMP (macOS, Intel builds): milliseconds
