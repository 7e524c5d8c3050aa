"""torchao int8 on MiniLM: torchao default vs ``reduce_range=True`` vs safeobs RTN vs safeobs data-aware.

Embedding fidelity against FP32 (SQNR, mean cosine, nearest-neighbour agreement) on the held-out
sentences, for each configuration on every int8 kernel torchao reaches (see ``safeobs.torchao.emulator``):

* this host's real kernels, eager (``torch._int_mm``) and ``torch.compile`` with Inductor ``freezing=True``;
* oneDNN's AVX2 ``gemm_api`` in eager, which saturates: run for real in a subprocess with
  ``ONEDNN_MAX_CPU_ISA=AVX2`` when the host reports AVX512-VNNI (only then does eager ``_int_mm`` call
  oneDNN), emulated bit-exactly otherwise;
* an AVX2 CPU's ``torch.compile`` freezing kernel (``onednn.qlinear_pointwise``, s8 source, ``gemm:jit``, which
  saturates): real on an AVX2-only host, emulated elsewhere (the int8 op bit-exact, the other ops eager);
* VNNI (exact int32): real on a VNNI host, emulated elsewhere.

"safeobs data-aware" is ``safeobs.torchao.quantize_(model, calibration=...)``: per draw ``d`` (``--draws``,
default 5) the calibration is a random 2/3 of ``safeobs.data.sentences('calib')`` (seed ``d``; the held-out
sentences come from other documents), one sentence per batch (no padding tokens in the statistics).  Its rows
are mean ± std over the draws.  The quantization time of every draw is measured next to torchao's
``quantize_`` (and a float forward pass over the same calibration data) in the same run.

Speed: the same Linear (MiniLM's 384->1536 and 1536->384) quantized by torchao and by safeobs,
timed interleaved in one run, eager and compiled, decode (M=1) and prefill (M=256) shaped.
Writes benchmarks/results/torchao.md, torchao.png and torchao.json.  About 30 minutes on a busy 2-core host.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import pickle
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torchao  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

import safeobs.torchao as sto  # noqa: E402
from safeobs import data
from safeobs.data import models
from safeobs.kernels import realkernel  # noqa: E402
from safeobs.torchao import emulator as et  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
STOCK = ("torchao default", "torchao reduce_range=True")
CONFIGS = {
    "torchao default": lambda: Stock(),
    "torchao reduce_range=True": lambda: Stock(reduce_range=True),
    "safeobs RTN": lambda: sto.Int8DynamicActivationInt8WeightConfig(),
    "safeobs data-aware": lambda: sto.Int8DynamicActivationInt8WeightConfig(),
}
DA = "safeobs data-aware"
SUBSET = 2 / 3


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sqnr(ref, y) -> float:
    ref, y = ref.double(), y.double()
    err = float(((y - ref) ** 2).sum())
    return float("inf") if err == 0 else float(10 * np.log10(float((ref**2).sum()) / err))


def _nearest(e):
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def metrics(ref, y) -> dict:
    return {
        "sqnr": sqnr(ref, y),
        "cos": float(F.cosine_similarity(ref.double(), y.double(), dim=1).mean()),
        "nn": float((_nearest(y.double()) == _nearest(ref.double())).double().mean()),
    }


@contextlib.contextmanager
def blas_threads(n):
    """numpy's BLAS thread count (the data-aware rounding's Cholesky/inverse), if threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def calibration_draw(tok, d: int) -> list[tuple]:
    """Draw ``d``: a seeded random 2/3 of the calibration sentences, one sentence per batch."""
    cal = data.sentences("calib")
    sub = random.Random(d).sample(cal, round(len(cal) * SUBSET))
    return [(b["input_ids"], b["attention_mask"]) for b in (tok([s]) for s in sub)]


def quantized(model, name, calibration=None):
    m = copy.deepcopy(model)
    t = time.perf_counter()
    if calibration is not None:
        sto.quantize_(m, CONFIGS[name](), calibration=calibration)
    else:
        quantize_(m, CONFIGS[name]())
    return m, time.perf_counter() - t


def codes_of(m) -> dict:
    """{Linear name: (qdata, scale)} of a quantize_'d model: what the forced-ISA subprocess rebuilds."""
    return {
        n: (mod.weight.qdata.numpy().copy(), mod.weight.scale.float().numpy().copy())
        for n, mod in sto.quantized_linears(m)
    }


# -- rows: which kernel, real or emulated, on this host ------------------------------------------------


def row_specs(host: str, cpu: str) -> list[dict]:
    """The kernel runs of the table, each labelled with what really ran on this ``host``."""
    native = "VNNI (native)" if host == "vnni" else f"{host.upper()} (native)"
    ke, kc = et.int_mm_kernel(host, "eager"), et.int_mm_kernel(host, "compiled")

    def what(k):
        return f"{k.backend} {k.op} {k.src}, {'saturating' if k.saturates else 'exact'}"

    rows = [
        dict(key="eager", label=f"{native}, eager ({what(ke)})", kind="real"),
        dict(key="compiled", label=f"{native}, torch.compile freezing ({what(kc)})", kind="compiled"),
    ]
    if host == "vnni":  # eager _int_mm calls oneDNN only when cpuinfo reports VNNI: the forced ISA reaches it
        rows.append(
            dict(
                key="forced",
                label=f"AVX2 kernels (oneDNN forced to AVX2 on an {cpu}), eager (onednn _int_mm gemm_api u8, saturating)",
                kind="forced",
            )
        )
    else:
        rows.append(
            dict(
                key="forced",
                label="AVX2 oneDNN gemm_api eager (= ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI CPU), emulated",
                kind="emulate",
                isa="avx2",
                path="onednn",
            )
        )
    if host != "avx2":
        rows.append(
            dict(
                key="avx2-compiled",
                label="AVX2 CPU, torch.compile freezing (onednn qlinear_pointwise s8, gemm:jit, saturating), "
                "emulated (int8 op bit-exact, other ops eager)",
                kind="emulate",
                isa="avx2",
                path="compiled",
            )
        )
    if host != "vnni":
        rows.append(
            dict(key="vnni", label="VNNI eager (exact int32), emulated", kind="emulate", isa="vnni", path="eager")
        )
    return rows


def evaluate(m, name, specs, sentences, tok, ref, compiled: bool) -> tuple[dict, torch.Tensor]:
    """Metrics of ``m`` on every in-process row (the forced rows run later in one subprocess)."""
    n = len(sentences)
    r = {}
    with torch.no_grad():
        y_eager = models.embed(m, sentences, tok, n)
    for spec in specs:
        if spec["kind"] == "real":
            r[spec["key"]] = metrics(ref, y_eager)
        elif spec["kind"] == "compiled":
            if name == "torchao reduce_range=True" or not compiled:
                r[spec["key"]] = None  # 7-bit codes: |pair| <= 191*64*2 < 32767, cannot saturate
                continue
            torch._dynamo.reset()
            with torch._inductor.config.patch(freezing=True), torch.no_grad():
                r[spec["key"]] = metrics(ref, models.embed(torch.compile(m), sentences, tok, n))
            torch._dynamo.reset()
        elif spec["kind"] == "emulate":
            with et.emulate(m, isa=spec["isa"], path=spec["path"]) as rep, torch.no_grad():
                y = models.embed(m, sentences, tok, n)
            r[spec["key"]] = {**metrics(ref, y), "saturated": rep.total}
        elif spec["kind"] == "forced":
            r[spec["key"]] = {}  # filled by forced_run (one subprocess for every model)
    return r, y_eager


# -- the forced-ISA subprocess (this file is its own worker: python bench_torchao.py IN.pkl OUT.pkl) --------


def forced_run(jobs, sentences, threads: int) -> tuple[dict, list]:
    """Eager embeddings of every job's model in ONE subprocess with ``ONEDNN_MAX_CPU_ISA=AVX2``."""
    job = {"sentences": list(sentences), "threads": threads, "jobs": jobs}
    return realkernel.run_worker(str(Path(__file__).resolve()), job, "avx2", 3600.0, label="forced-AVX2 torchao")


def _worker(src: str, dst: str) -> None:
    from safeobs.torchao._worker import _info

    with open(src, "rb") as f:
        job = pickle.load(f)
    torch.set_num_threads(job["threads"])
    model, tok = models.minilm().eval(), models.tokenizer()
    out = []
    for j in job["jobs"]:
        m = copy.deepcopy(model)
        quantize_(m, Stock(reduce_range=j["reduce_range"]))  # the same Int8Tensor layout; then the given codes
        with torch.no_grad():
            for name, (q, s) in j["codes"].items():
                w = m.get_submodule(name).weight
                w.qdata.copy_(torch.from_numpy(q))
                w.scale.copy_(torch.from_numpy(s).reshape(w.scale.shape))
            y = models.embed(m, job["sentences"], tok, len(job["sentences"]))
            # the emulator in THIS process: float ops (some of which oneDNN's forced ISA changes too) are the
            # same in both runs, so a difference could only come from the int8 kernel
            with et.emulate(m, isa="avx2", path="onednn") as rep:
                y_emu = models.embed(m, job["sentences"], tok, len(job["sentences"]))
        out.append((y.numpy(), bool(torch.equal(y, y_emu)), rep.total))
    with open(dst, "wb") as f:
        pickle.dump((_info(torch), out), f)


def _summary(values: list[dict]) -> dict:
    """mean / std / min / max of each metric over the draws (+ the per-draw values)."""
    out = {}
    for k in ("sqnr", "cos", "nn", "saturated"):
        v = [x[k] for x in values if k in x]
        if v:
            out[k] = float(np.mean(v))
            out[k + "_std"] = float(np.std(v))
            out[k + "_min"], out[k + "_max"] = float(np.min(v)), float(np.max(v))
            out[k + "_draws"] = [float(x) for x in v]
    out["draws"] = len(values)
    return out


def fidelity(sentences, host: str, cpu: str, draws: int, compile_draws: int, threads: int, blas: int) -> dict:
    model = models.minilm().eval()
    tok = models.tokenizer()
    n = len(sentences)
    with torch.no_grad():
        ref = models.embed(model, sentences, tok, batch_size=n)
    specs = row_specs(host, cpu)
    rows, qtime, runs, timing = {}, {}, [], []
    # stock configurations and safeobs RTN: deterministic, one run each
    for name in ("torchao default", "torchao reduce_range=True", "safeobs RTN"):
        m, qtime[name] = quantized(model, name)
        r, _ = evaluate(m, name, specs, sentences, tok, ref, compiled=True)
        rows[name] = r
        runs.append((name, None, m, r))
        log(
            f"{name}: quantize_ {qtime[name]:.2f} s; {json.dumps({k: round(v['sqnr'], 2) for k, v in r.items() if v and 'sqnr' in v})}"
        )
    # safeobs data-aware: one quantize_ per calibration draw, timed next to torchao's quantize_ and a float
    # forward pass over the same calibration data
    per_draw = []
    for d in range(draws):
        cal = calibration_draw(tok, d)
        t_stock = []
        for _ in range(2):
            _, t = quantized(model, "torchao default")
            t_stock.append(t)
        t = time.perf_counter()
        with torch.no_grad():
            for batch in cal:
                model(*batch)
        t_fwd = time.perf_counter() - t
        _, t_rtn = quantized(model, "safeobs RTN")
        with blas_threads(blas):
            m, t_da = quantized(model, DA, calibration=cal)
        _, t = quantized(model, "torchao default")
        t_stock.append(t)
        ts = float(np.median(t_stock))
        timing.append(dict(draw=d, torchao=ts, forward=t_fwd, safeobs_rtn=t_rtn, safeobs_da=t_da))
        r, _ = evaluate(m, DA, specs, sentences, tok, ref, compiled=d < compile_draws)
        per_draw.append(r)
        runs.append((DA, d, m, r))
        log(
            f"draw {d}: {len(cal)} sentences, quantize_ {t_da:.1f} s (torchao {ts:.2f} s, forward {t_fwd:.2f} s); "
            f"{json.dumps({k: round(v['sqnr'], 2) for k, v in r.items() if v and 'sqnr' in v})}"
        )
    # the forced-ISA rows: every model in ONE subprocess, checked against the emulator
    forced = next((s for s in specs if s["kind"] == "forced"), None)
    info = None
    if forced is not None:
        jobs = [dict(reduce_range=name == "torchao reduce_range=True", codes=codes_of(m)) for name, _, m, _ in runs]
        log(f"forced-AVX2 subprocess: {len(jobs)} models")
        info, ys = forced_run(jobs, sentences, threads)
        for (name, d, m, r), (y, same, sat) in zip(runs, ys):
            r[forced["key"]].update(metrics(ref, torch.from_numpy(y)), saturated=sat, emulator_equal=same)
        log(f"forced-AVX2 worker saw {info}")
    for key in [s["key"] for s in specs]:
        vals = [r[key] for r in per_draw if r.get(key)]
        if vals:
            rows.setdefault(DA, {})[key] = _summary(vals)
        for r in per_draw:
            if r.get(key) and "emulator_equal" in r[key]:
                rows[DA][key]["emulator_equal"] = all(x[key]["emulator_equal"] for x in per_draw if x.get(key))
    da_t = np.array([t["safeobs_da"] for t in timing])
    st_t = np.array([t["torchao"] for t in timing])
    fw_t = np.array([t["forward"] for t in timing])
    qtime[DA] = float(np.mean(da_t))
    cal_time = {
        "per_draw": timing,
        "ratio_vs_quantize": [float(x) for x in da_t / st_t],
        "ratio_vs_quantize_plus_forward": [float(x) for x in da_t / (st_t + fw_t)],
        "ratio_rtn_vs_quantize": [float(t["safeobs_rtn"] / t["torchao"]) for t in timing],
    }
    return dict(
        rows=rows,
        specs=[{k: v for k, v in s.items()} for s in specs],
        qtime=qtime,
        calibration_time=cal_time,
        forced_info=info,
    )


def speed(repeats: int) -> dict:
    """Median per-call time ratio safeobs / torchao default, interleaved, same host, one run."""
    out = {}
    torch.manual_seed(0)
    for k, n in ((384, 1536), (1536, 384)):
        base = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()
        mods = {}
        for name in ("torchao default", "safeobs RTN"):
            mods[name] = copy.deepcopy(base)
            quantize_(mods[name], CONFIGS[name]())
        for compiled in (False, True):
            fns = {}
            for name, m in mods.items():
                if compiled:
                    torch._dynamo.reset()
                    with torch._inductor.config.patch(freezing=True):
                        c = torch.compile(m)
                        for mm in (1, 256):
                            c(torch.randn(mm, k))  # compile both shapes
                    fns[name] = c
                else:
                    fns[name] = m
            for mm in (1, 256):
                x = torch.randn(mm, k)
                calls = 400 if mm == 1 else (40 if compiled else 2)  # eager prefill: ATen's int loop is slow
                times = {name: [] for name in fns}
                with torch.no_grad(), torch._inductor.config.patch(freezing=True):
                    for fn in fns.values():
                        fn(x)
                    for _ in range(repeats):
                        for name, fn in fns.items():
                            t = time.perf_counter()
                            for _ in range(calls):
                                fn(x)
                            times[name].append((time.perf_counter() - t) / calls)
                med = {name: float(np.median(v)) for name, v in times.items()}
                key = f"{k}->{n} M={mm} {'compiled' if compiled else 'eager'}"
                out[key] = {
                    "torchao_us": med["torchao default"] * 1e6,
                    "safeobs_us": med["safeobs RTN"] * 1e6,
                    "ratio": med["safeobs RTN"] / med["torchao default"],
                }
                log(f"speed {key}: ratio {out[key]['ratio']:.3f}")
            torch._dynamo.reset()
    return out


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, specs = res["rows"], res["specs"]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        v = [r[s["key"]]["sqnr"] if r.get(s["key"]) else 0 for s in specs]
        err = [r[s["key"]].get("sqnr_std", 0) if r.get(s["key"]) else 0 for s in specs]
        ax.bar(np.arange(len(specs)) + i * width, v, width, yerr=err if name == DA else None, capsize=3, label=name)
    ax.set_xticks(np.arange(len(specs)) + width * (len(rows) - 1) / 2)
    native = "VNNI (native)" if res["host"] == "vnni" else f"{res['host'].upper()} (native)"
    ticks = {
        "eager": f"{native}\neager",
        "compiled": f"{native}\ntorch.compile freezing",
        "forced": "AVX2 oneDNN gemm_api, eager\n" + ("(forced ISA, real)" if res["host"] == "vnni" else "(emulated)"),
        "avx2-compiled": "AVX2 CPU, torch.compile\nfreezing (emulated)",
        "vnni": "VNNI eager\n(emulated)",
    }
    ax.set_xticklabels([ticks[s["key"]] for s in specs], fontsize=8)
    ax.set_ylim(15, None)
    ax.set_ylabel("embedding SQNR vs FP32 (dB)")
    ax.set_title(f"MiniLM, torchao int8 dynamic quantization on {res['cpu']} ({res['host']}): data-aware = mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(m, name) -> str:
    if m is None:
        return "- (7-bit codes cannot saturate)" if name == "torchao reduce_range=True" else "- (not run)"
    if "sqnr_std" in m:
        s = (
            f"{m['sqnr']:.2f} ± {m['sqnr_std']:.2f} ({m['sqnr_min']:.2f}-{m['sqnr_max']:.2f}) / "
            f"{m['cos']:.4f} / {m['nn'] * 100:.0f}% [{m['draws']} draws]"
        )
    else:
        s = f"{m['sqnr']:.2f} / {m['cos']:.4f} / {m['nn'] * 100:.0f}%"
    if m.get("saturated"):
        s += f" ({m['saturated']:,.0f} sat.)"
    if m.get("emulator_equal") is not None:
        s += " =emu" if m["emulator_equal"] else " **≠emu**"
    return s


def targets(res) -> list[str]:
    rows, host = res["rows"], res["host"]
    keys = {s["key"]: s["label"] for s in res["specs"]}
    vnni_key = "eager" if host == "vnni" else "vnni"
    ref = rows["torchao default"][vnni_key]["sqnr"]
    sat_keys = [k for k in ("forced", "avx2-compiled", "compiled") if k in keys]
    if host != "avx2":
        sat_keys.remove("compiled")
    lines = [f"- torchao default on VNNI ({'real' if host == 'vnni' else 'emulated'}): {ref:.2f} dB."]
    for k in sat_keys:
        m = rows[DA][k]
        ok = m["sqnr"] >= ref
        lines.append(
            f"- safeobs data-aware on {keys[k]}: {m['sqnr']:.2f} ± {m['sqnr_std']:.2f} dB (worst draw "
            f"{m['sqnr_min']:.2f}): **{'met' if ok else 'missed'}** ({m['sqnr'] - ref:+.2f} dB mean, "
            f"{m['sqnr_min'] - ref:+.2f} dB worst draw); torchao default there: {rows['torchao default'][k]['sqnr']:.2f} dB."
        )
    ct = res["calibration_time"]
    r1, r2 = np.array(ct["ratio_vs_quantize"]), np.array(ct["ratio_vs_quantize_plus_forward"])
    lines.append(
        f"- Calibration time here (one timing per draw, fidelity threads, not interleaved): safeobs "
        f"`quantize_(calibration=...)` / torchao `quantize_` = {r1.mean():.0f}x ± {r1.std():.0f}, / (torchao "
        f"`quantize_` + one float pass over the calibration) = {r2.mean():.1f}x ± {r2.std():.1f}.  The target "
        f"(<= 5x) is judged in `calibration.md` (`bench_calibration.py`: interleaved rounds, 1 thread), not here."
    )
    return lines


def report(res) -> str:
    rows, specs = res["rows"], res["specs"]
    ct = res["calibration_time"]
    info = res.get("forced_info")
    lines = [
        "# torchao int8 dynamic quantization on MiniLM: torchao vs safeobs RTN vs safeobs data-aware",
        "",
        f"Host: {res['cpu']} ({res['isa_text']}), {res['threads']} threads (speed: 1; data-aware rounding: "
        f"{res['blas']} BLAS thread), torch {res['torch']}, torchao {res['torchao']}.  {res['n']} held-out sentences "
        "(`safeobs.data.sentences('heldout')`), all-MiniLM-L6-v2 (`safeobs.models.minilm()`), every Linear quantized "
        "by `quantize_`.  torchao's PT2E x86 Inductor passes registered in this process: "
        f"{res['x86_passes']}.",
        "",
        "Which kernel ran (torch 2.13 + torchao 0.18, `safeobs.torchao.emulator.int_mm_kernel`): eager `torch._int_mm` "
        "calls oneDNN only when cpuinfo reports AVX512-VNNI, and is an exact ATen loop elsewhere; `torch.compile` "
        "with `freezing=True` rewrites torchao's s8xs8 graph (non-VNNI CPUs) into `onednn.qlinear_pointwise`, which "
        "saturates on AVX2 CPUs (`gemm:jit`) and is exact on AVX-512 without VNNI (`ref_int8`, recorded in "
        "tests/data/torchao-avx512); on VNNI CPUs it stays extern `_int_mm` (exact), or `qlinear_pointwise` u8 "
        "(exact) once torchao's PT2E x86 passes are registered.  *emulated* rows run the same quantized model "
        "through `safeobs.torchao.emulator` (bit-exact against the real kernels in tests/test_torchao.py).",
    ]
    if info:
        lines += [
            "",
            f"The forced row ran in a subprocess with ONEDNN_MAX_CPU_ISA={info['onednn_max_isa']} (cpuinfo VNNI "
            f"{info['cpu_vnni']}, ATen capability {info['capability']}): torchao's u8 `_int_mm` through oneDNN's AVX2 "
            "`gemm_api`.  Its saturated-lane counts are the emulator's; `=emu`: the real embeddings are bit-identical "
            "to the emulator's run in the same subprocess (same float ops: ONEDNN_MAX_CPU_ISA changes some float "
            "ops' last bits too, so the in-process runs are not the reference).  A compiled model forced to AVX2 on this host runs the "
            "same extern `_int_mm` (no separate row).",
        ]
    lines += [
        "",
        "Cells: embedding SQNR vs FP32 (dB) / mean cosine / nearest-neighbour agreement.  safeobs data-aware: "
        f"mean ± std (min-max) over calibration draws (each a seeded random 2/3 of the {res['n_calib']} "
        "`sentences('calib')`, disjoint from the held-out ones).",
        "",
        "| run | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for s in specs:
        lines.append(f"| {s['label']} | " + " | ".join(_cell(rows[name].get(s["key"]), name) for name in rows) + " |")
    lines += ["", "## Targets", "", *targets(res), "", "## Quantization time", ""]
    lines += [
        "Per calibration draw, in the same run, whole MiniLM (36 Linears): torchao `quantize_` "
        "(`Int8DynamicActivationInt8WeightConfig()`, median of 3 calls around the others), one float forward pass "
        "over the draw's calibration sentences (what a stock flow that calibrates pays: static activation scales, "
        "SmoothQuant), safeobs `quantize_` without calibration (RTN at safe scales) and with it (data-aware: "
        "the same forward pass with `x x^T` hooks + the rounding of every Linear).",
        "",
        "| draw | torchao quantize_ (s) | float forward (s) | safeobs RTN (s) | safeobs data-aware (s) | DA / torchao | DA / (torchao + forward) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r1, r2 in zip(ct["per_draw"], ct["ratio_vs_quantize"], ct["ratio_vs_quantize_plus_forward"]):
        lines.append(
            f"| {t['draw']} | {t['torchao']:.2f} | {t['forward']:.2f} | {t['safeobs_rtn']:.2f} | "
            f"{t['safeobs_da']:.1f} | {r1:.0f}x | {r2:.0f}x |"
        )
    lines += [
        "",
        "Whole-model `quantize_` for the other configurations (s): "
        + ", ".join(f"{n} {t:.2f}" for n, t in res["qtime"].items() if n != DA),
        "",
        "## Speed: safeobs / torchao default, same host, same run",
        "",
        "Median time per call of one quantized Linear, the two configurations timed interleaved "
        f"({res['repeats']} rounds).  Both produce the same `Int8Tensor` format (data-aware too: only the codes "
        "and scales differ), so the same kernels run.",
        "",
        "| call | torchao (us) | safeobs (us) | ratio |",
        "|---|---|---|---|",
    ]
    for k, v in res["speed"].items():
        lines.append(f"| {k} | {v['torchao_us']:.1f} | {v['safeobs_us']:.1f} | {v['ratio']:.3f} |")
    lines += ["", f"Total benchmark time {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _isa_text(host: str, flags: set) -> str:
    have = [f for f in ("avx2", "avx512f", "avx512_vbmi", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"dispatch ISA {host}; flags {' '.join(have)}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=None, help="held-out sentences (default: all)")
    ap.add_argument("--draws", type=int, default=5, help="calibration draws of the data-aware rows")
    ap.add_argument("--compile-draws", type=int, default=5, help="draws that are also torch.compile'd")
    ap.add_argument("--repeats", type=int, default=7, help="speed rounds (0: skip the speed section)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the fidelity runs (speed: always 1)")
    ap.add_argument("--blas", type=int, default=1, help="numpy BLAS threads of the data-aware rounding")
    ap.add_argument("--out", type=Path, default=OUT, help="results directory")
    ap.add_argument("--render", action="store_true", help="only re-render torchao.md/png from the saved json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads((args.out / "torchao.json").read_text())
        plot(res, args.out / "torchao.png")
        (args.out / "torchao.md").write_text(report(res))
        return
    if args.draws < 1:
        raise ValueError("--draws must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    host, cpu = realkernel.host_isa(), realkernel.cpu_name()
    sentences = data.sentences("heldout")[: args.sentences]
    log(f"{len(sentences)} sentences on {cpu} ({host})")
    res = fidelity(sentences, host, cpu, args.draws, args.compile_draws, args.threads, args.blas)
    torch.set_num_threads(1)
    sp = speed(args.repeats) if args.repeats else {}
    res.update(
        cpu=cpu,
        host=host,
        isa_text=_isa_text(host, realkernel._cpu_flags()),
        x86_passes=et.x86_passes_registered(),
        threads=args.threads,
        blas=args.blas,
        torch=torch.__version__,
        torchao=torchao.__version__,
        n=len(sentences),
        n_calib=len(data.sentences("calib")),
        speed=sp,
        repeats=args.repeats,
        seconds=time.time() - t0,
    )
    args.out.mkdir(exist_ok=True)
    (args.out / "torchao.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / "torchao.png")
    (args.out / "torchao.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].endswith(".pkl"):  # realkernel.run_worker's subprocess side
        _worker(sys.argv[1], sys.argv[2])
    else:
        main()
