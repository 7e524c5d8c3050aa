"""Cost of safeobs on LLM-sized weights (issue 20): verify, the solver and torchao quantize_ vs layer size.

Random Student-t (df=3) weights in Llama-2-7B shapes (4096x4096, 4096x11008, 11008x4096) and a square
1024 -> 11008 sweep.  Each measurement runs in a fresh subprocess (time: best of a few runs; memory: the
process's peak RSS above its RSS before the call, VmHWM reset through /proc/self/clear_refs):

* code scan floor: ``q.int_repr().abs().amax(1)``;
* ``safeobs.verify(q, "x86")`` now (strided pair sums, safeobs.pairsums) and before (the ``weight_pairs``
  table, a copy of the old check_codes below; only up to ``OLD_MAX`` weights);
* ``safeobs.solver.safe_qparams(w)`` (x86 layout, per-channel symmetric);
* torchao ``quantize_`` vs ``safeobs.torchao`` ``quantize_`` (Int8DynamicActivationInt8WeightConfig) of one
  4096x11008 Linear and of one decoder block (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008).

``q`` holds safe codes (safe_qparams' scales), so verify finds nothing, like on a safeobs model.

``--part audit`` (issue 20, LLM scale; the other part's numbers are kept from the last run's scale.json):

* ``audit_layer`` of one torchao Linear (stock torchao RTN codes of the same weights: unsafe on oneDNN's AVX2
  matmul), now (strided, :func:`safeobs.tools.audit.pair_violations`) and before (the (OC, n) index tables,
  a copy below), per shape of the sweep: the cost against layer size, log-log;
* ``safeobs audit --json`` (the CLI, in-process) of a 32-block Llama-2-7B-shaped stock torchao model saved with
  ``safeobs.torchao.save`` (~6.5G int8 weights), built block by block and deleted afterwards; the file is read
  memory-mapped, so RSS counts the file pages it touched (reclaimable page cache) next to the anonymous memory;
* ``safeobs.torchao.quantize_`` of one decoder block: torchao, safeobs RTN, and data-aware (calibration), side
  by side, extrapolated to 32 blocks;
* MiniLM (real weights): stock torchao and safeobs.torchao, ``audit`` and ``verify`` of each model.

Writes benchmarks/results/scale.md, scale.json and scale.png.  About 5-8 minutes on 2 cores (the verify part;
the audit part another ~10, most of it building the 7 GB model); not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's safeobs, also in the workers (PYTHONPATH below)

from safeobs.core.pairsums import CHUNK  # noqa: E402

LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]
SWEEP = [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192), (11008, 11008)]
OLD_MAX = 50_000_000  # old verify: ~0.45 us and ~80 B per weight; beyond this it costs minutes and GBs
# data-aware quantize_ of a block without down (K=11008): the whole block reached 6.7 GB RSS on this shared host
QB_NAMES = ("q", "k", "v", "o", "gate", "up")
AUDIT_OLD_MAX = 20_000_000  # old audit_layer: its qint8 copy and index tables, ~1.2 GB at 16.8M weights
BLOCK = {
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (11008, 4096),
    "up": (11008, 4096),
    "down": (4096, 11008),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- worker (one measurement per process) -------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure(fn, repeats: int):
    """(best seconds, peak extra MB of the first call, result)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS")
    except OSError:  # no clear_refs: ru_maxrss is then a high-water mark since start
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = fn()
    times = [time.perf_counter() - t0]
    peak = _rss_kb("VmHWM")
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), max(0, peak - base) / 1024, out


def _old_check_codes(codes, layout="x86", op=None, groups=None):
    """safeobs.verify.check_codes before issue 20: every pair of layout.weight_pairs, materialised."""
    from safeobs.kernels.layout import infer_op, weight_pairs

    c = np.asarray(codes).astype(np.int64)
    op = infer_op(c.shape, op)
    pairs = weight_pairs(c.shape, layout, op, groups)
    flat = c.ravel()
    a, b = flat[pairs[:, 0]], flat[pairs[:, 1]]
    pos = np.maximum(a, 0) + np.maximum(b, 0)
    neg = np.minimum(a, 0) + np.minimum(b, 0)
    return int(np.count_nonzero(pos > 128) + np.count_nonzero(neg < -128))


def _old_pair_violations(codes, kernel, op, groups, isa):
    """safeobs.tools.audit.pair_violations before issue 20: (OC, n) index tables of every pair of the kernel."""
    from safeobs.kernels.layout import kernel_order, kernel_pairs

    shape = codes.shape
    pos = kernel_pairs(kernel, shape, op, groups, isa)
    oc = int(np.prod(kernel_order(shape, op, groups).shape[:2]))
    if len(pos) == 0:
        return {"pairs": 0, "violating_pairs": 0, "channels": [], "per_channel": {}}
    order = kernel_order(shape, op, groups).reshape(oc, -1)
    ia, ib = order[:, pos[:, 0]], order[:, pos[:, 1]]
    flat = codes.astype(np.int64).ravel()
    a, b = flat[ia], flat[ib]
    psum = np.maximum(a, 0) + np.maximum(b, 0)
    nsum = np.minimum(a, 0) + np.minimum(b, 0)
    excess = np.maximum(psum - 128, -128 - nsum)
    count = (excess > 0).sum(axis=1)
    chans = np.flatnonzero(count)
    worst = excess.argmax(axis=1)[chans]
    per = {int(c): [int(ia[c, k]), int(ib[c, k]), int(a[c, k]), int(b[c, k])] for c, k in zip(chans, worst)}
    return {"pairs": len(pos) * oc, "violating_pairs": int(count.sum()), "channels": chans.tolist(), "per_channel": per}


def _old_audit_layer(layer, combos):
    """The old audit_layer: every combo's pairs, materialised (no dedupe of equal kernels)."""
    from safeobs.tools.audit import kernel_for

    codes = layer.weight.int_repr().numpy()  # the old QLayer.codes of a torchao layer (after its qint8 copy)
    out = {}
    for combo in combos:
        engine, isa = combo.split("/")
        out[combo] = _old_pair_violations(codes, kernel_for(layer, engine, isa), layer.op, layer.groups, isa)
    return out


def _old_audit_model(m, runtimes):
    return _old_audit_layer(runtimes.layers(m)[0], runtimes.TORCHAO_COMBOS)


def _torchao_layer(w, torch):
    """A stock torchao quantize_ Linear (Int8DynamicActivationInt8WeightConfig) of float weights ``w``."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(torch.as_tensor(w), requires_grad=False)
    m = torch.nn.Sequential(lin)
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


class _Sampler:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms in a thread."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def sample(self):
        for line in Path("/proc/self/status").read_text().splitlines():
            k = line.split(":")[0]
            if k in self.peak:
                self.peak[k] = max(self.peak[k], int(line.split()[1]))

    def run(self):
        while not self.stop.wait(0.02):
            self.sample()

    def __enter__(self):
        self.sample()
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()
        self.sample()


def _cpu():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Block:
    """Factory of one Llama-2-7B decoder block's Linears with a forward (attention mixing left out: the Linears see
    x, and down sees silu(gate(x)) * up(x)), for data-aware quantize_."""

    @staticmethod
    def make(torch, weights: dict):
        class _Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for k, w in weights.items():
                    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                    lin.weight = torch.nn.Parameter(torch.as_tensor(w), requires_grad=False)
                    setattr(self, k, lin)

            def forward(self, x):
                y = self.o(self.q(x) + self.k(x) + self.v(x))
                z = torch.nn.functional.silu(self.gate(x)) * self.up(x)
                return y + self.down(z) if hasattr(self, "down") else (y, z)

        return _Block().eval()


def _linear(shape, path, torch):
    lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.load(path, mmap_mode="r")[:]))
    return lin


def worker(job: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    kind, d = job["kind"], Path(job.get("dir", "."))
    if kind in ("scan", "verify_new", "verify_old", "check_codes"):
        import safeobs

        codes = torch.from_numpy(np.load(d / f"codes_{job['tag']}.npy"))
        scale = torch.from_numpy(np.load(d / f"scale_{job['tag']}.npy")).double()
        q = torch._make_per_channel_quantized_tensor(codes, scale, torch.zeros(len(scale), dtype=torch.long), 0)
        del codes
        if kind == "scan":
            fn, reps = (lambda: q.int_repr().abs().amax(1)), 20
        elif kind == "verify_new":
            fn, reps = (lambda: len(safeobs.verify(q, "x86"))), 10
        elif kind == "check_codes":  # what safeobs.torchao's quantize_ runs on Int8Tensor.qdata (no int_repr copy)
            from safeobs.core.verify import check_codes

            qd = q.int_repr().numpy()
            fn, reps = (lambda: len(check_codes(qd, "x86", op="linear"))), 10
        else:
            fn, reps = (lambda: _old_check_codes(q.int_repr().numpy(), "x86")), 1
        sec, mb, out = _measure(fn, reps)
        return dict(sec=sec, mb=mb, violations=None if kind == "scan" else int(out))
    if kind == "safe_qparams":
        from safeobs.core.solver import safe_qparams

        w = torch.from_numpy(np.load(d / f"w_{job['tag']}.npy"))
        sec, mb, _ = _measure(lambda: safe_qparams(w, layout="x86"), 2)
        return dict(sec=sec, mb=mb)
    if kind == "audit_layers":
        import logging

        logging.disable(logging.WARNING)
        from safeobs.tools import audit, runtimes

        rows = []
        for tag in job["tags"]:
            m = _torchao_layer(np.load(d / f"w_{tag}.npy"), torch)
            lay = runtimes.layers(m)[0]
            sec, mb, out = _measure(partial(audit.audit_layer, lay, runtimes.TORCHAO_COMBOS), 5)
            k = out["kernels"]["compiled/avx2"]
            row = dict(
                audit_new=dict(sec=sec, mb=mb, channels=len(k["channels"]), violating_pairs=k["violating_pairs"])
            )
            if tag in job["old"]:
                sec, mb, old = _measure(partial(_old_audit_model, m, runtimes), 1)
                k = old["compiled/avx2"]
                assert (len(k["channels"]), k["violating_pairs"]) == (
                    row["audit_new"]["channels"],
                    row["audit_new"]["violating_pairs"],
                ), "old and new audits disagree"
                row["audit_old"] = dict(sec=sec, mb=mb)
            rows.append(row)
            del m, lay
        return dict(rows=rows)
    if kind == "build_model":
        return build_model(Path(job["path"]), job["blocks"])
    if kind == "cli_audit":
        import contextlib
        import io

        from safeobs.cli import main as cli_main

        t0, c0 = time.perf_counter(), _cpu()
        import safeobs.torchao  # noqa: F401  (the import cost is reported apart)

        imp = dict(sec=time.perf_counter() - t0, cpu=_cpu() - c0)
        buf = io.StringIO()
        Path("/proc/self/clear_refs").write_text("5")
        with _Sampler() as smp, contextlib.redirect_stdout(buf):
            t0, c0 = time.perf_counter(), _cpu()
            rc = cli_main(["audit", job["path"], "--json", "-q"])
            sec, cpu = time.perf_counter() - t0, _cpu() - c0
        out = json.loads(buf.getvalue())
        chans = sum(len(lay["kernels"]["compiled/avx2"]["channels"]) for lay in out["layers"])
        return dict(
            sec=sec,
            cpu=cpu,
            imports=imp,
            rc=rc,
            hwm_mb=_rss_kb("VmHWM") / 1024,
            anon_mb=smp.peak["RssAnon"] / 1024,
            file_mb=smp.peak["RssFile"] / 1024,
            json_mb=len(buf.getvalue()) / 2**20,
            layers=len(out["layers"]),
            unsafe_layers=len(out["unsafe_layers"]),
            unsafe_channels=chans,
            weights=sum(int(np.prod(lay["shape"])) for lay in out["layers"]),
        )
    if kind == "quantize_block":
        import logging

        logging.disable(logging.WARNING)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
        from torchao.quantization import quantize_

        import safeobs.torchao as sto

        torch.manual_seed(0)
        calib = [(torch.randn(job["tokens"], 4096),) for _ in range(job["batches"])]
        weights = {k: np.load(d / f"w_{s[0]}x{s[1]}.npy", mmap_mode="r") for k, s in BLOCK.items() if k in job["names"]}
        quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), Stock())  # first-call costs out of the timing
        out = {}
        for config in ("torchao", "safeobs", "safeobs_calibrated"):
            m = Block.make(torch, {k: np.array(w) for k, w in weights.items()})
            if config == "torchao":
                fn = partial(quantize_, m, Stock())
            elif config == "safeobs":
                fn = partial(sto.quantize_, m)
            else:
                fn = partial(sto.quantize_, m, calibration=calib)
            c0 = _cpu()
            sec, mb, _ = _measure(fn, 1)
            out[config] = dict(sec=sec, mb=mb, cpu=_cpu() - c0)
            del m
        return out
    if kind == "minilm":
        import logging

        logging.disable(logging.WARNING)
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
        from torchao.quantization import quantize_

        import safeobs
        import safeobs.torchao as sto
        from safeobs.data import models
        from safeobs.tools import audit

        base = models.minilm().eval()
        out = {}
        for config in ("torchao", "safeobs"):
            m = copy.deepcopy(base)
            quantize_(m, Stock() if config == "torchao" else sto.Int8DynamicActivationInt8WeightConfig())
            a_sec, a_mb, res = _measure(partial(audit.audit, m), 3)
            v_sec, v_mb, rep = _measure(partial(safeobs.verify, m), 3)
            out[config] = dict(
                audit=dict(sec=a_sec, mb=a_mb),
                verify=dict(sec=v_sec, mb=v_mb),
                layers=len(res["layers"]),
                weights=sum(int(np.prod(lay["shape"])) for lay in res["layers"]),
                unsafe_layers=len(res["unsafe_layers"]),
                unsafe_channels=sum(len(lay["kernels"]["compiled/avx2"]["channels"]) for lay in res["layers"]),
                verify_violations=len(rep),
            )
        return out
    # torchao quantize_: stock or safeobs, one Linear or one decoder block; fresh modules per run
    import logging

    logging.disable(logging.WARNING)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
    from torchao.quantization import quantize_

    import safeobs.torchao as sto

    cfg = (lambda: Stock()) if job["config"] == "torchao" else (lambda: sto.Int8DynamicActivationInt8WeightConfig())
    quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), cfg())  # first-call costs out of the timing
    shapes = {"down": BLOCK["down"]} if kind == "torchao_linear" else BLOCK

    def build():
        return torch.nn.ModuleDict({k: _linear(s, d / f"w_{s[0]}x{s[1]}.npy", torch) for k, s in shapes.items()})

    times, mbs = [], []
    for _ in range(2):
        m = build()
        sec, mb, _ = _measure(partial(quantize_, m, cfg()), 1)
        times.append(sec)
        mbs.append(mb)
        del m
    return dict(sec=min(times), mb=mbs[0])


POOL = 1 << 24  # Student-t draws the 7B model's rows are cut from (drawing 6.5G of them costs minutes)


def t_pool(seed: int = 20) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, POOL) * 0.02).astype(np.float32)


def pool_weights(shape, rng, pool) -> np.ndarray:
    """Float32 weights whose rows are random windows of ``pool`` (Student-t draws) with random signs."""
    n, k = shape
    w = np.lib.stride_tricks.sliding_window_view(pool, k)[rng.integers(0, len(pool) - k, n)]
    w *= rng.choice(np.array([-1, 1], np.float32), (n, 1))
    return w


def build_model(path: Path, blocks: int) -> dict:
    """A ``blocks``-block Llama-2-7B-shaped stock torchao model saved with ``safeobs.torchao.save`` at ``path``.

    Block by block: each Linear's float rows are random windows of a pool of Student-t (df=3) draws with random
    signs, quantized by torchao's own per-row symmetric RTN (``choose_qparams_affine``, then ``round(w / s)``;
    checked bit for bit against ``Int8Tensor.from_hp`` on the first Linear) into an ``Int8Tensor``; each block is
    saved on its own, then all are loaded back memory-mapped into one model and saved as one state file."""
    import logging

    logging.disable(logging.WARNING)
    import torch
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    import safeobs.torchao as sto
    from safeobs.tools.serialization import safe_globals

    t0 = time.perf_counter()
    rng = np.random.default_rng(20)
    pool = t_pool()
    template = _torchao_layer(np.ones((2, 8), np.float32), torch)[0].weight
    checked = False

    def quantized(shape):
        nonlocal checked
        n, k = shape
        w = torch.from_numpy(pool_weights(shape, rng, pool))
        scale, _ = choose_qparams_affine(
            w,
            MappingType.SYMMETRIC,
            [1, k],
            torch.int8,
            -128,
            127,
            eps=torch.finfo(torch.float32).eps,
            scale_dtype=torch.float32,
            zero_point_dtype=torch.int8,
            keepdim=True,
        )
        q = torch.clamp(torch.round(w * (1.0 / scale)), -128, 127).to(torch.int8)
        t = Int8Tensor(
            q,
            scale,
            [1, k],
            torch.float32,
            zero_point=torch.zeros_like(q[:, :1]),
            act_quant_kwargs=template.act_quant_kwargs,
        )
        if not checked:
            ref = Int8Tensor.from_hp(w, PerRow(), act_quant_kwargs=template.act_quant_kwargs)
            assert torch.equal(ref.qdata, q) and torch.equal(ref.scale, scale), "RTN differs from torchao's"
            checked = True
        return t

    files = []
    for b in range(blocks):
        f = path.parent / f"{path.stem}.block{b}.pt"
        torch.save({f"{k}.weight": quantized(s) for k, s in BLOCK.items()}, f)
        files.append(f)
        log(f"  block {b + 1}/{blocks} built ({time.perf_counter() - t0:.0f} s)")
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    with safe_globals():
        for f in files:
            sd = torch.load(f, mmap=True, weights_only=True)
            blk = torch.nn.Module()
            for k, s in BLOCK.items():
                lin = torch.nn.Linear(s[1], s[0], bias=False, device="meta")
                lin.weight = torch.nn.Parameter(sd[f"{k}.weight"], requires_grad=False)
                blk.add_module(k, lin)
            model.layers.append(blk)
    sto.save(model, path)
    del model
    for f in files:
        f.unlink()
    return dict(sec=time.perf_counter() - t0, blocks=blocks, file_gb=path.stat().st_size / 1e9, rtn_checked=checked)


def run_job(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env, timeout=3600
    )
    if out.returncode:
        raise RuntimeError(f"{job}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- parent -------------------------------------------------------------------------------------------


def make_data(d: Path, shapes, seed=0):
    import torch

    from safeobs.core.solver import safe_qparams

    for i, s in enumerate(shapes):
        rng = np.random.default_rng(seed + i)
        w = (rng.standard_t(3, s) * 0.02).astype(np.float32)
        tag = f"{s[0]}x{s[1]}"
        np.save(d / f"w_{tag}.npy", w)
        scale, zp = safe_qparams(torch.from_numpy(w), layout="x86")
        q = torch.quantize_per_channel(torch.from_numpy(w), scale.double(), zp, 0, torch.qint8)
        np.save(d / f"codes_{tag}.npy", q.int_repr().numpy())
        np.save(d / f"scale_{tag}.npy", scale.numpy())
        del w, q


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    au = res.get("audit")
    fig, axes = plt.subplots(1, 3 if au else 2, figsize=(16 if au else 11, 4.2))
    ax, bx = axes[0], axes[1]
    rows = sorted(res["layers"], key=lambda r: r["numel"])
    for key, label, mk in [
        ("scan", "code scan (floor)", "o"),
        ("verify_new", "verify x86 (pairsums)", "s"),
        ("check_codes", "check_codes x86 (numpy codes)", "d"),
        ("verify_old", "verify x86 (weight_pairs, before)", "x"),
        ("safe_qparams", "safe_qparams (solver)", "^"),
    ]:
        pts = [(r["numel"], r[key]) for r in rows if r.get(key)]
        if pts:
            n = [p[0] for p in pts]
            ax.plot(n, [p[1]["sec"] for p in pts], marker=mk, label=label)
            bx.plot(n, [max(p[1]["mb"], 0.1) for p in pts], marker=mk, label=label)
    n = [r["numel"] for r in rows]
    bx.plot(n, [v / 2**20 for v in n], "k--", lw=0.8, label="int8 weight size")
    for a, yl in ((ax, "seconds"), (bx, "peak extra RSS (MB)")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("weights in the layer")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("time")
    bx.set_title("memory")
    if au:
        cx = axes[2]
        arows = sorted(au["layers"], key=lambda r: r["numel"])
        for key, label, mk in (
            ("audit_new", "audit_layer now (strided)", "s"),
            ("audit_old", "audit_layer before", "x"),
        ):
            pts = [(r["numel"], r[key]["sec"]) for r in arows if r.get(key)]
            cx.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, label=label)
        n0, t0 = arows[-1]["numel"], arows[-1]["audit_new"]["sec"]
        n = np.array([r["numel"] for r in arows], dtype=float)
        cx.plot(n, t0 * n / n0, "k--", lw=0.8, label="linear (slope 1)")
        cx.set_xscale("log")
        cx.set_yscale("log")
        cx.set_xlabel("weights in the layer (1024x1024 ... 11008x11008)")
        cx.set_ylabel("seconds")
        cx.grid(True, which="both", alpha=0.3)
        cx.legend(fontsize=8)
        cx.set_title("audit of one torchao Linear (8 torchao columns)")
    fig.suptitle(f"safeobs cost vs layer size ({res['host']}, {res['isa']}, VNNI native)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ms(m) -> str:
    """Milliseconds, three significant digits."""
    v = m["sec"] * 1e3
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def write_md(res, path):
    L = [
        "# Scale: verify, solver and torchao quantize_ on LLM-sized weights (issue 20)",
        "",
        f"Host: {res['host']} ({res['isa']}, {res['cores']} cores, shared); torch {res['torch']}, "
        f"torchao {res['torchao']}, numpy {res['numpy']}.  `python benchmarks/bench_scale.py` "
        f"({res['minutes']:.1f} min).  Student-t (df=3) weights, safe per-channel codes; each number from a fresh "
        "subprocess: time = best of 1-20 runs, memory = peak RSS above the RSS before the call.",
        "",
        '`verify` = `safeobs.verify(q, "x86")` of the qint8 tensor (its `int_repr()` copy included); `check_codes` '
        "= the same check on the numpy codes (what `safeobs.torchao` runs after quantizing); `before` = the "
        f"`weight_pairs` table (old check_codes), run up to {OLD_MAX / 1e6:.0f}M weights only.",
        "",
        "| weight | weights | scan ms | verify ms (x scan) | check_codes ms | verify before ms | speed-up "
        "| verify MB (x int8) | before MB | safe_qparams ms | safe_qparams MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(res["layers"], key=lambda r: (r["numel"], r["shape"])):
        sc, nw, old, sq = r["scan"], r["verify_new"], r.get("verify_old"), r["safe_qparams"]
        int8_mb = r["numel"] / 2**20
        L.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['numel'] / 1e6:.1f}M | {ms(sc)} | "
            f"{ms(nw)} ({nw['sec'] / sc['sec']:.1f}x) | {ms(r['check_codes'])} | "
            + (f"{ms(old)} | {old['sec'] / nw['sec']:.0f}x | " if old else "not run | - | ")
            + f"{nw['mb']:.0f} ({nw['mb'] / int8_mb:.2f}x) | "
            + (f"{old['mb']:.0f} | " if old else "- | ")
            + f"{ms(sq)} | {sq['mb']:.0f} |"
        )
    L += [
        "",
        "| torchao `quantize_` | torchao s | safeobs.torchao s | ratio | torchao MB | safeobs MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, key in (("one 4096x11008 Linear", "torchao_linear"), ("one Llama-2-7B decoder block", "torchao_block")):
        a, b = res[key]["torchao"], res[key]["safeobs"]
        L.append(
            f"| {name} | {a['sec']:.2f} | {b['sec']:.2f} | {b['sec'] / a['sec']:.2f}x | {a['mb']:.0f} | {b['mb']:.0f} |"
        )
    big = next(r for r in res["layers"] if tuple(r["shape"]) == (4096, 11008))
    blk = res["torchao_block"]
    ratio_v = big["verify_new"]["sec"] / big["scan"]["sec"]
    mem_v = big["verify_new"]["mb"] / (big["numel"] / 2**20)
    ratio_b = blk["safeobs"]["sec"] / blk["torchao"]["sec"]
    share = big["check_codes"]["sec"] / res["torchao_linear"]["safeobs"]["sec"]
    ok = lambda c: "met" if c else "**missed**"
    L += [
        "",
        "Targets (4096x11008, x86 layout):",
        "",
        f"- verify <= 10x the code scan: {ratio_v:.1f}x, {ok(ratio_v <= 10)}.",
        f"- verify peak extra memory <= 2x the int8 weight: {mem_v:.2f}x, {ok(mem_v <= 2)} "
        "(the qint8 tensor's `int_repr()` copy is 1x of it; pairsums adds row chunks of "
        f"{CHUNK // 1024}K codes and int16/bool temporaries of that size).",
        f"- safeobs.torchao RTN quantize_ of a decoder block <= 1.5x torchao's time: {ratio_b:.2f}x, "
        f"{ok(ratio_b <= 1.5)}.",
        f"- the post-quantize check inside safeobs.torchao's quantize_: check_codes of 4096x11008 takes "
        f"{ms(big['check_codes'])} ms = {100 * share:.1f}% of quantizing that Linear "
        f"({'< 10%: kept on' if share < 0.1 else '>= 10%: should be opt-in'}).",
        "",
    ]
    if res.get("audit"):
        L += audit_md(res["audit"])
    path.write_text("\n".join(L))


def audit_md(au) -> list[str]:
    """The issue-20 audit part of scale.md."""
    L = [
        "## Audit at LLM scale (issue 20)",
        "",
        f"Run {au['date']} (`python benchmarks/bench_scale.py --part audit`, {au['minutes']:.1f} min, load average "
        f"{au['load'][0]:.1f} on {au['cores']} cores: the host was shared), host {au['host']} ({au['isa']}, native; "
        f"torch {au['torch']}, torchao {au['torchao']}).  Audit columns: torchao's 8 (eager/compiled x avx2, avx512, "
        "avx512_vbmi, vnni); only compiled/avx2 (oneDNN gemm:jit K blocks) forms saturating pairs, so each layer is "
        "scanned once (columns with the same pairs share one scan).",
        "",
        "### One torchao Linear: audit now vs before",
        "",
        "Stock torchao RTN codes of Student-t (df=3) weights (rows: windows of a pool of draws, as below; unsafe: "
        "many channels violate on compiled/avx2).  "
        "`before` = the old `audit_layer` (the qint8 copy, `int_repr`, then (OC, n) int64 index tables per column); "
        f"run up to {AUDIT_OLD_MAX / 1e6:.0f}M weights.  Time = best of 5 (before: 1) in a fresh process; MB = peak RSS "
        "above the RSS before the call.",
        "",
        "| weight | weights | audit ms | ns / weight | audit MB | before ms | speed-up | before MB | violating channels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(au["layers"], key=lambda r: (r["numel"], r["shape"])):
        nw, old = r["audit_new"], r.get("audit_old")
        L.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['numel'] / 1e6:.1f}M | {ms(nw)} | {1e9 * nw['sec'] / r['numel']:.2f} | "
            f"{nw['mb']:.0f} | "
            + (f"{ms(old)} | {old['sec'] / nw['sec']:.0f}x | {old['mb']:.0f} | " if old else "not run | - | - | ")
            + f"{nw['channels']} of {r['shape'][0]} |"
        )
    per = {tuple(r["shape"]): r["audit_new"]["sec"] for r in au["layers"]}
    if all(s in per for s in BLOCK.values()):
        block_s = sum(per[s] for s in BLOCK.values())
        L += [
            "",
            f"Per decoder block (q, k, v, o, gate, up, down): {block_s:.2f} s of audit_layer; x32 blocks = "
            f"{32 * block_s:.1f} s extrapolated (the CLI run below adds loading, the torchao import and JSON).",
        ]
    qb = au.get("quantize_block")
    L += [
        "",
        "### `safeobs audit --json` of the 32-block Llama-2-7B-shaped torchao model",
        "",
    ]
    b = au["build"]
    L += [
        f"{au['blocks']} blocks x (4x 4096x4096, 2x 11008x4096, 4096x11008), stock torchao "
        "`Int8DynamicActivationInt8WeightConfig` codes (per-row symmetric RTN, bit for bit torchao's: checked "
        f"{'yes' if b['rtn_checked'] else 'no'}), saved with `safeobs.torchao.save`: {b['file_gb']:.2f} GB, built "
        f"block by block in {b['sec']:.0f} s and deleted after.  Rows are windows of {POOL >> 20}M Student-t (df=3) "
        "draws with random signs (drawing 6.5G values costs minutes).  The CLI runs in-process in a fresh worker "
        "(`main(['audit', FILE, '--json', '-q'])`); the file was just written, so it is read from the page cache.",
        "",
        "| run | wall s | CPU s | peak RSS MB | of which file pages MB | anonymous MB | JSON MB | layers | unsafe layers "
        "| violating channels (compiled/avx2) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(au["cli"]):
        L.append(
            f"| {i + 1} | {c['sec']:.1f} | {c['cpu']:.1f} | {c['hwm_mb']:.0f} | {c['file_mb']:.0f} | {c['anon_mb']:.0f} | "
            f"{c['json_mb']:.1f} | {c['layers']} | {c['unsafe_layers']} | {c['unsafe_channels']:,} |"
        )
    best = min(c["sec"] for c in au["cli"])
    ok = lambda c: "met" if c else "**missed**"
    L += [
        "",
        f"(`import safeobs.torchao`, i.e. torch + torchao, before the audit: {au['cli'][0]['imports']['sec']:.1f} s "
        "wall, not included.)",
        "",
        "### `safeobs.torchao.quantize_` of one decoder block",
        "",
        f"The block's Linears {', '.join(QB_NAMES)} (down, K=11008, left out: a trial run of the whole block's "
        "data-aware call reached 6.7 GB RSS before it was stopped, over this shared host's budget); three calls side by side "
        "in one worker (fresh float modules each): torchao's `quantize_`, "
        "safeobs RTN, safeobs data-aware (`calibration=` 4 batches x 128 tokens of N(0, 1) activations; the block's "
        "forward feeds x to q, k, v, o's input is their sum, down's input silu(gate(x)) * up(x)).  The data-aware "
        "rounding (`safeobs.core.rounding`) is being sped up separately; this is what it costs today.",
        "",
        "| call | s | CPU s | peak extra MB | x torchao | 32 blocks (extrapolated) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, name in (
        ("torchao", "torchao"),
        ("safeobs", "safeobs.torchao RTN"),
        ("safeobs_calibrated", "safeobs data-aware"),
    ):
        if not qb:
            L.append(
                "| not measured in this run: the worker was stopped after 20 min (4.6 min of CPU: the host's load "
                "average was ~17 on 2 cores), see below | | | | | |"
            )
            break
        L.append(
            f"| {name} | {qb[k]['sec']:.2f} | {qb[k]['cpu']:.2f} | {qb[k]['mb']:.0f} | "
            f"{qb[k]['sec'] / qb['torchao']['sec']:.2f}x | {32 * qb[k]['sec'] / 60:.1f} min (without down) |"
        )
    mm = au.get("minilm") or {}
    L += [
        "",
        "### MiniLM (real weights)",
        "",
        "`safeobs.models.minilm()`, every Linear quantized by `quantize_`; audit (8 torchao columns) and "
        "`safeobs.verify` (x86 layout) of the whole model, best of 3.",
        "",
        "| config | layers | weights | audit ms | verify ms | unsafe layers (audit) | violating channels "
        "(compiled/avx2) | verify violations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in (k for k in ("torchao", "safeobs") if k in mm):
        m = mm[k]
        L.append(
            f"| {k} | {m['layers']} | {m['weights'] / 1e6:.1f}M | {ms(m['audit'])} | {ms(m['verify'])} | "
            f"{m['unsafe_layers']} | {m['unsafe_channels']} | {m['verify_violations']} |"
        )
    if au.get("errors"):
        L += ["", "Stages that failed in this run:", ""] + [f"- {k}: `{v}`" for k, v in au["errors"].items()]
    if not au.get("cli"):
        return L + [""]
    c = au["cli"][0]
    L += [
        "",
        "Targets:",
        "",
        f"- `safeobs audit` of the 32-block 7B-shaped torchao model <= 60 s on this 2-core host: best of 2 runs "
        f"{best:.1f} s wall ({min(x['cpu'] for x in au['cli']):.1f} s CPU), {ok(best <= 60)}.",
        f"- peak memory < 10 GB: {max(x['hwm_mb'] for x in au['cli']) / 1024:.1f} GB RSS, of which "
        f"{max(x['anon_mb'] for x in au['cli']) / 1024:.2f} GB anonymous (the rest: pages of the memory-mapped "
        f"file, page cache the kernel can drop), {ok(max(x['hwm_mb'] for x in au['cli']) < 10240)}.",
        f"- `--json` linear in the model: {c['json_mb']:.1f} MB for {c['weights'] / 1e9:.2f}G weights and "
        f"{c['unsafe_channels']:,} violating channels (every channel listed, at most "
        "100 worst pairs per layer and column).",
        "",
    ]
    return L


def _stage(out: dict, name: str, fn):
    """Run one stage; a failure is recorded (``out['errors']``) and the others still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark stage, reported in the results
        out.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[-600:]}"
        log(f"{name} failed: {out['errors'][name]}")
        return None


def run_audit_part(shapes, blocks: int) -> dict:
    """The issue-20 audit part: the 7B model file, per-layer audit now/before, MiniLM, quantize_ of a block."""
    out = dict(layers=[], blocks=blocks)
    with tempfile.TemporaryDirectory(prefix="safeobs-scale-7b-", dir=os.environ.get("SAFEOBS_SCALE_DIR")) as tmp:
        path = Path(tmp) / "llama2_7b_torchao.pt"
        log(f"building the {blocks}-block model in {path}")
        out["build"] = _stage(out, "build", lambda: run_job(dict(kind="build_model", path=str(path), blocks=blocks)))
        log(f"built: {out['build']}")
        out["cli"] = []
        for i in range(2 if out["build"] else 0):
            r = _stage(out, f"cli{i}", lambda: run_job(dict(kind="cli_audit", path=str(path))))
            if r:
                out["cli"].append(r)
            log(f"safeobs audit run {i + 1}: {r}")
    with tempfile.TemporaryDirectory(prefix="safeobs-scale-") as tmp:
        d = Path(tmp)
        log(f"generating {len(shapes)} float weights")
        pool, rng = t_pool(), np.random.default_rng(0)
        for sh in shapes:
            np.save(d / f"w_{sh[0]}x{sh[1]}.npy", pool_weights(sh, rng, pool))
        del pool
        tags = [f"{sh[0]}x{sh[1]}" for sh in shapes]
        old = [t for t, sh in zip(tags, shapes) if sh[0] * sh[1] <= AUDIT_OLD_MAX]
        got = _stage(out, "layers_job", lambda: run_job(dict(kind="audit_layers", dir=tmp, tags=tags, old=old)))
        for sh, row in zip(shapes, (got or {}).get("rows", [])):
            out["layers"].append(dict(shape=list(sh), numel=sh[0] * sh[1], **row))
            log(f"{sh}: {row}")
        out["minilm"] = _stage(out, "minilm", lambda: run_job(dict(kind="minilm")))
        log(f"minilm: {out['minilm']}")
        job = dict(kind="quantize_block", dir=tmp, tokens=128, batches=4, names=QB_NAMES)
        out["quantize_block"] = _stage(out, "quantize_block", lambda: run_job(job))
        log(f"quantize_block: {out['quantize_block']}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true", help="small sweep only (smoke test of this script)")
    ap.add_argument(
        "--part", choices=("all", "verify", "audit"), default="all", help="run one part, keep the other's numbers"
    )
    ap.add_argument("--blocks", type=int, default=32, help="decoder blocks of the audited model (default 32)")
    ap.add_argument("--report-only", action="store_true", help="rewrite scale.md and scale.png from scale.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.report_only:
        res = json.loads((OUT / "scale.json").read_text())
        plot(res, OUT / "scale.png")
        write_md(res, OUT / "scale.md")
        return
    import torch
    import torchao

    from safeobs.kernels import realkernel

    t_start = time.time()
    shapes = sorted(set(LLAMA + SWEEP), key=lambda s: (s[0] * s[1], s))
    if args.quick:
        shapes = [(1024, 1024), (4096, 11008), (4096, 4096), (11008, 4096)]
    out = Path(tempfile.gettempdir()) / "safeobs-scale-quick" if args.quick else OUT
    out.mkdir(exist_ok=True)
    host = dict(
        host=realkernel.cpu_name(),
        isa=realkernel.host_isa(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        torchao=torchao.__version__,
        numpy=np.__version__,
    )
    prev = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    if args.part in ("all", "verify"):
        res = dict(host, layers=[])
        with tempfile.TemporaryDirectory(prefix="safeobs-scale-") as tmp:
            d = Path(tmp)
            log(f"generating {len(shapes)} weights and their safe codes")
            make_data(d, shapes)
            for s in shapes:
                tag, numel = f"{s[0]}x{s[1]}", s[0] * s[1]
                row = dict(shape=list(s), numel=numel)
                kinds = ["scan", "verify_new", "check_codes", "safe_qparams"] + (
                    ["verify_old"] if numel <= OLD_MAX else []
                )
                for kind in kinds:
                    row[kind] = run_job(dict(kind=kind, dir=tmp, tag=tag))
                    log(f"{tag} {kind}: {row[kind]['sec']:.3f} s, {row[kind]['mb']:.0f} MB")
                res["layers"].append(row)
            for kind in ("torchao_linear", "torchao_block"):
                res[kind] = {}
                for config in ("torchao", "safeobs"):
                    res[kind][config] = run_job(dict(kind=kind, dir=tmp, config=config))
                    log(f"{kind} {config}: {res[kind][config]['sec']:.2f} s, {res[kind][config]['mb']:.0f} MB")
        res["minutes"] = (time.time() - t_start) / 60
        res["date"] = time.strftime("%Y-%m-%d")
    else:
        res = {k: v for k, v in prev.items() if k != "audit"}
    if args.part in ("all", "audit"):
        t_audit = time.time()
        res["audit"] = dict(host, **run_audit_part(shapes, 2 if args.quick else args.blocks))
        res["audit"]["minutes"] = (time.time() - t_audit) / 60
        res["audit"]["date"] = time.strftime("%Y-%m-%d")
        res["audit"]["load"] = os.getloadavg()
    elif "audit" in prev:
        res["audit"] = prev["audit"]
    (out / "scale.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "scale.png")
    write_md(res, out / "scale.md")
    log(f"wrote {out / 'scale.md'} ({(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
