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

import numpy as np
import torch

logging.disable(logging.WARNING)
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
from torchao.quantization import quantize_

import safeobs.torchao as sto


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        L = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.q, self.k, self.v, self.o = L(4096, 4096), L(4096, 4096), L(4096, 4096), L(4096, 4096)
        self.gate, self.up, self.down = L(4096, 11008), L(4096, 11008), L(11008, 4096)

    def forward(self, x):
        a = self.o(self.q(x) + self.k(x) + self.v(x))
        return a + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def make(seed=0):
    g = np.random.default_rng(seed)
    b = Block().eval()
    with torch.no_grad():
        for m in b.children():
            w = g.standard_t(3, size=tuple(m.weight.shape)).astype(np.float32) * 0.02
            m.weight.copy_(torch.from_numpy(w))
    return b


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
