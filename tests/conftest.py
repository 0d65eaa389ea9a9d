import os

# Multi-process tests launch torchrun; keep every process single-threaded on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
