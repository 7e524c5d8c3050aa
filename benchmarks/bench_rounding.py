"""Data-aware rounding at LLM scale (issue 20): time and peak memory of ``round_weight``, blocked vs the old
per-column implementation (``tests/_rounding_reference.py``), side by side in one run.

Every case runs in a fresh subprocess: it builds the weight (Student-t, df=3) and ``H = E[x x^T]`` of correlated
activations ``x = z A + eps`` (``z`` ~ N(0, I_256), per-input noise, a mean: H is the exact second moment,
rank 256 + diagonal + mean), then measures ``round_weight(w, H, mean, layout="x86")`` with the 5-scale search
(``SCALE_SEARCH``; the default is now the tightest safe scale alone, which costs less) once: wall time and
peak RSS above the RSS just before the call (a 2 ms sampler thread on /proc/self/statm), against the bytes of H
(float64).  Old and new run on the same inputs in the same run; the old one only where it is affordable.

    PYTHONPATH=. python benchmarks/bench_rounding.py            # writes benchmarks/results/rounding.{md,png,json}
    PYTHONPATH=. python benchmarks/bench_rounding.py --quick    # 256 and 512 only, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (OC, K, run the old implementation too)
CASES = [(1024, 1024, True), (2048, 2048, True), (4096, 4096, False), (4096, 11008, False)]
QUICK = [(256, 256, True), (512, 512, True)]


def _inputs(oc: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(oc, k)) * 0.02).astype(np.float32)
    a = rng.normal(size=(256, k)) / 16  # z A: correlated inputs
    noise = rng.uniform(0.05, 1.0, size=k) ** 2  # per-input noise variance
    mu = rng.normal(size=k) * 0.3
    h = a.T @ a  # E[x x^T] = A^T A + diag(noise) + mu mu^T, built in place (one K x K float64 buffer)
    h[np.arange(k), np.arange(k)] += noise
    h += np.outer(mu, mu)
    return w, h, mu


def _child(oc: int, k: int, impl: str) -> dict:
    import threading

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    w, h, mu = _inputs(oc, k)
    if impl == "old":
        sys.path.insert(0, str(ROOT / "tests"))
        from _rounding_reference import round_weight
    else:
        from safeobs.core.rounding import round_weight
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    import gc

    gc.collect()
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    # the 5-scale search (the default until the scale search was turned off): 5x the recursion of the default
    r = round_weight(w, h, mu, layout="x86", multipliers=(0.90, 0.94, 0.97, 1.0, 1.03))
    sec = time.perf_counter() - t0
    stop.set()
    t.join()
    peak[0] = max(peak[0], rss())
    np.save(f"/tmp/bench_rounding_{impl}_{oc}_{k}.npy", r.codes)
    return dict(
        oc=oc,
        k=k,
        impl=impl,
        seconds=sec,
        peak_mb=(peak[0] - base) / 2**20,
        h_mb=h.nbytes / 2**20,
        gain=float(np.mean(r.error / np.maximum(r.rtn_error, 1e-300))),
        extra={k2: (v if isinstance(v, (int, str)) else str(v)) for k2, v in r.extra.items()},
        load=os.getloadavg()[0],
    )


def run_case(oc: int, k: int, impl: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(oc), str(k), impl],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agreement(oc: int, k: int) -> dict:
    a = np.load(f"/tmp/bench_rounding_old_{oc}_{k}.npy")
    b = np.load(f"/tmp/bench_rounding_new_{oc}_{k}.npy")
    return dict(codes_equal=float(np.mean(a == b)), rows_equal=float(np.mean(np.all(a == b, axis=1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", help="comma list of OCxK[:old], e.g. 1024x1024:old,4096x4096")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), int(args.child[1]), args.child[2])))
        return
    cases = QUICK if args.quick else CASES
    if args.cases:
        cases = []
        for c in args.cases.split(","):
            shape, _, old = c.partition(":")
            oc, k = (int(v) for v in shape.split("x"))
            cases.append((oc, k, old == "old"))
    from safeobs.kernels import realkernel

    rows = []
    for oc, k, old in cases:
        for impl in ("new", "old") if old else ("new",):
            rows.append(run_case(oc, k, impl))
            print(json.dumps(rows[-1]), flush=True)
        if old:
            rows[-1]["agreement"] = rows[-2]["agreement"] = _agreement(oc, k)
    import torch

    res = dict(
        host=realkernel.cpu_name(),
        isa=realkernel.host_isa(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        numpy=np.__version__,
        blas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "default (2)"),
        rows=rows,
    )
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rounding.json").write_text(json.dumps(res, indent=1))
    write_md(res)
    plot(res)


def write_md(res: dict) -> None:
    lines = [
        "# Data-aware rounding at LLM scale (issue 20)",
        "",
        f"Host: {res['host']} ({res['isa']}, {res['cores']} cores, shared with other jobs: the load average at "
        f"each run is in the table); torch {res['torch']}, numpy {res['numpy']}, BLAS threads {res.get('blas_threads')}. "
        "`benchmarks/bench_rounding.py`.",
        "",
        '`round_weight(w, H, mean, layout="x86", multipliers=SCALE_SEARCH)` (5 scales; the default is now 1 scale, cheaper); Student-t (df=3) weights, H = E[x x^T] of',
        "correlated activations. Each run in a fresh process; memory is the peak RSS above the RSS before the call.",
        "`new` = blocked (this module), `old` = the per-column implementation it replaced (tests/_rounding_reference.py).",
        "",
        "| weight (OC x K) | impl | seconds | peak MB | H MB (float64) | peak / H | recursion | mean error / RTN | codes equal to old | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ag = r.get("agreement")
        agt = f"{ag['codes_equal'] * 100:.4f}% (rows {ag['rows_equal'] * 100:.1f}%)" if ag else ""
        lines.append(
            f"| {r['oc']} x {r['k']} | {r['impl']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['h_mb']:.0f} | "
            f"{r['peak_mb'] / r['h_mb']:.2f} | {r['extra'].get('dtype', 'float64')} | {r['gain']:.3f} | {agt} | {r['load']:.1f} |"
        )
    pairs = {}
    for r in res["rows"]:
        pairs.setdefault((r["oc"], r["k"]), {})[r["impl"]] = r["seconds"]
    lines += ["", "Speed-up (old / new, same run):", ""]
    for (oc, k), d in pairs.items():
        if "old" in d:
            lines.append(f"- {oc} x {k}: {d['old'] / d['new']:.1f}x")
    (RESULTS / "rounding.md").write_text("\n".join(lines) + "\n")


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for impl, mark in (("new", "o-"), ("old", "s--")):
        rs = [r for r in res["rows"] if r["impl"] == impl]
        if not rs:
            continue
        work = [r["oc"] * r["k"] ** 2 for r in rs]
        ax[0].loglog(work, [r["seconds"] for r in rs], mark, label=impl)
        ax[1].loglog([r["h_mb"] for r in rs], [r["peak_mb"] for r in rs], mark, label=impl)
    x = np.array([1024**3, 4096 * 11008**2], dtype=float)
    ax[0].set_xlabel("OC * K^2")
    ax[0].set_ylabel("seconds")
    ax[0].axhline(10, color="grey", lw=0.8, ls=":")
    ax[0].text(x[0], 11, "10 s target (4096^2)", fontsize=8)
    hm = np.array([8, 1000.0])
    ax[1].loglog(hm, 3 * hm, ":", color="grey", label="3x H")
    ax[1].set_xlabel("H MB (float64)")
    ax[1].set_ylabel("peak RSS above baseline, MB")
    for a in ax:
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"round_weight at LLM scale ({res['host']}, {res['isa']}, shared host)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "rounding.png", dpi=110)


if __name__ == "__main__":
    main()
