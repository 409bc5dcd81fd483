"""Pipeline stages: one module per stage of dvc.yaml, each runnable as ``python -m stages.X``.

Importing this package (which ``python -m stages.X`` does before the stage imports torch)
tells OpenMP's idle threads to spin only briefly before they sleep, unless the user chose a
policy. Left spinning (the default), a stage's threads keep the cores busy while waiting for
each other; on a machine shared with another job they take the time the other job's
threads need: two fine-tune runs on 2 cores each took 3.4 times as long as one alone, not
2. A short spin costs nothing measurable when the machine is free (the README's Speed
section has the figures).
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # GNU OpenMP (Linux wheels of torch): spin iterations
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # LLVM and Intel OpenMP (macOS, Intel builds): milliseconds
