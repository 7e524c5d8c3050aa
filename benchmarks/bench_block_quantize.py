"""Time and peak memory of quantizing one Llama-2-7B-shaped decoder block: torchao ``quantize_`` vs safeobs RTN vs
safeobs data-aware (``calibration=``: 4 batches x 128 tokens of N(0, 1) activations, H from the block's own inputs).

One fresh process per configuration: ``python benchmarks/bench_block_quantize.py {torchao,safeobs,calibrated}``
prints one JSON row (seconds, peak RSS above the baseline with the float block built).  The numbers are quoted in
benchmarks/results/scale.md ("One decoder block, data-aware").  Student-t (df=3) weights, no bias.
"""

import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

logging.disable(logging.WARNING)
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
from torchao.quantization import quantize_

import safeobs.torchao as sto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import BLOCK, Block  # noqa: E402  (the same block as bench_scale's quantize_block job)


def make(seed=0):
    g = np.random.default_rng(seed)
    weights = {k: (g.standard_t(3, size=shape) * 0.02).astype(np.float32) for k, shape in BLOCK.items()}
    return Block.make(torch, weights)


config = sys.argv[1]
torch.manual_seed(0)
calib = [(torch.randn(128, 4096),) for _ in range(4)]
quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), Stock())
m = make()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if config == "torchao":
    quantize_(m, Stock())
elif config == "safeobs":
    sto.quantize_(m)
else:
    sto.quantize_(m, calibration=calib)
sec = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(
    json.dumps(
        dict(config=config, sec=round(sec, 2), peak_extra_mb=round((rss1 - rss0) / 1024), base_mb=round(rss0 / 1024))
    )
)
