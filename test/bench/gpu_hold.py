"""Holds GIB of random int64 data on the GPU for test/bench/gpu.sh.

Prints one JSON line: its pid, the bytes held, a checksum (the int64 sum, exact modulo 2^64 in any order) and
the time of a device-to-host copy of the whole tensor into pinned and into pageable host memory. Then, for every
"check" line on stdin, recomputes the checksum on the GPU and prints it as JSON.
"""
import json
import os
import sys
import time

import torch

gib = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
n = int(gib * (1 << 30)) // 8
gen = torch.Generator(device="cuda").manual_seed(20261123)
x = torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64, device="cuda", generator=gen)
torch.cuda.synchronize()


def checksum():
    torch.cuda.synchronize()
    return int(x.sum().item())


def d2h(pinned):
    host = torch.empty(n, dtype=torch.int64, pin_memory=pinned)
    torch.cuda.synchronize()
    start = time.perf_counter()
    host.copy_(x)
    torch.cuda.synchronize()
    return time.perf_counter() - start


report = {
    "pid": os.getpid(),
    "bytes": n * 8,
    "gpu": torch.cuda.get_device_name(0),
    "checksum": checksum(),
    "d2h_pinned_s": d2h(True),
    "d2h_pageable_s": d2h(False),
}
print(json.dumps(report), flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        print(json.dumps({"checksum": checksum()}), flush=True)
