"""Record real-kernel vectors on this host: ``python -m safeobs.kernels.record --out DIR`` (issue 16).

Re-runs the recorded oneDNN cases (inputs of ``tests/data/onednn-avx512`` or ``--cases DIR``) on every CPU kind
this host reaches (:func:`safeobs.kernels.realkernel.mode_for`: native, and a forced AVX512_CORE / AVX2 run where it
is a real CPU of that kind), one fresh process per mode, with ``ONEDNN_VERBOSE=1`` so that each case keeps the oneDNN
implementation that ran it.  Writes ``cases_<family>.npz`` with the inputs, ``y_<isa>`` and ``impl_<isa>`` per CPU
kind, and ``host.json``.  Refresh the test vectors with it when torch or oneDNN changes, then compare them with
``safeobs.emulator``.

A Skylake-SP (``isa="avx512"``) is reached only on such a CPU (or a VNNI CPU without VBMI forced down): a forced
run on a VBMI host is ``avx512_vbmi`` (:func:`safeobs.kernels.realkernel.forced_avx512_isa`).  The CPUID-masking
shim used for the shipped ``skx`` column is not part of safeobs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import realkernel

DEFAULT_CASES = Path(__file__).resolve().parents[2] / "tests" / "data" / "onednn-avx512"


def load_cases(directory: Path, kinds=("op",)) -> dict[str, list[dict]]:
    """``{family: [case dict]}`` from ``cases_<family>.npz`` files (the realkernel case format), the cases whose
    recorded ``kind`` is in ``kinds`` ("op": a ``torch.ops.quantized`` call; "module_dynamic": the ao dynamic
    Linear module, which asks for 7-bit inputs)."""
    out = {}
    for f in sorted(Path(directory).glob("cases_*.npz")):
        d = np.load(f)
        cases = []
        for i, p in enumerate(json.loads(s) for s in d["params_json"]):
            if p.get("kind", "op") not in kinds:
                continue
            pre = f"c{i:03d}_"
            c = {
                k: p[k]
                for k in (
                    "op",
                    "relu",
                    "x_scale",
                    "x_zp",
                    "y_scale",
                    "y_zp",
                    "groups",
                    "stride",
                    "padding",
                    "dilation",
                    "reduce_range",
                )
                if k in p
            }
            c.update(
                x=d[pre + "x"],
                w=d[pre + "w"],
                w_zp=0,
                bias=d[pre + "bias"] if p["bias"] else None,
                w_scale=d[pre + "w_scale"] if p["w_scale"] == "array" else p["w_scale"],
            )
            if p.get("kind") == "module_dynamic":
                c["reduce_range"] = True
            cases.append(c)
        out[f.name[len("cases_") : -4]] = cases
    if not out:
        raise ValueError(f"no cases_<family>.npz files in {directory}")
    return out


def _impl(lines: str) -> str:
    """``kind|implementation|weight format`` of the oneDNN exec lines of one case (";"-joined), or "none"."""
    found = []
    for line in lines.splitlines():
        f = line.split(",")
        if len(f) > 8 and f[0] == "onednn_verbose" and f[3] == "exec" and f[5] != "reorder":
            wei = [m.split(":") for m in f[8].split() if m.startswith("wei")]
            found.append(f"{f[5]}|{f[6]}|{wei[0][4] if wei and len(wei[0]) > 4 else ''}")
    return ";".join(found) or "none"


def run_verbose(cases: list[dict], engine: str = "onednn") -> tuple[list, list[str]]:
    """Subprocess side: run each case with this process's kernels, capturing fd 1 (oneDNN's verbose output)."""
    import torch

    from ._realkernel_worker import run_case

    torch.set_num_threads(1)
    torch.backends.quantized.engine = engine
    libc = ctypes.CDLL(None)
    outs, impls = [], []
    saved = os.dup(1)
    with tempfile.TemporaryFile() as buf:
        for c in cases:
            buf.seek(0)
            buf.truncate()
            libc.fflush(None)
            os.dup2(buf.fileno(), 1)
            try:
                outs.append(run_case(torch, c))
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
            buf.seek(0)
            impls.append(_impl(buf.read().decode(errors="replace")))
    os.close(saved)
    return outs, impls


def record(out: Path, cases_dir: Path = DEFAULT_CASES, isas=("avx2", "avx512", "avx512_vbmi", "vnni")) -> dict:
    """Run every case on each CPU kind of ``isas`` this host reaches; write the npz files; return a summary."""
    families = load_cases(cases_dir)
    flat = [c for cs in families.values() for c in cs]
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for isa in isas:
        mode = realkernel.mode_for(isa, "onednn")
        if mode is None or mode == "haswell":  # qemu: no ONEDNN_VERBOSE timing games, and slow; skip
            continue
        ys, impls = realkernel.run_worker(
            "safeobs.kernels.record",
            {"cases": flat},
            mode,
            1800.0,
            label="recorder",
            env={"ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"},
        )
        results[isa] = (mode, ys, impls)
    if not results:
        raise RuntimeError("this host reaches no CPU kind to record")
    start = 0
    for fam, cs in families.items():
        arrays = {
            "params_json": np.array(
                [json.dumps({k: v for k, v in c.items() if not isinstance(v, np.ndarray)}, default=float) for c in cs]
            )
        }
        for i, c in enumerate(cs):
            for k in ("x", "w", "w_scale", "bias"):
                if isinstance(c.get(k), np.ndarray):
                    arrays[f"c{i:03d}_{k}"] = c[k]
        for isa, (_, ys, impls) in results.items():
            for i in range(len(cs)):
                arrays[f"c{i:03d}_y_{isa}"] = ys[start + i]
            arrays[f"impl_{isa}"] = np.array(impls[start : start + len(cs)])
        np.savez_compressed(out / f"cases_{fam}.npz", **arrays)
        start += len(cs)
    import torch

    host = {
        "cpu": realkernel.cpu_name(),
        "host_isa": realkernel.host_isa(),
        "torch": torch.__version__,
        "modes": {isa: realkernel.describe(m, "onednn") for isa, (m, _, _) in results.items()},
        "cases": len(flat),
    }
    (out / "host.json").write_text(json.dumps(host, indent=1))
    return host


def main(argv=None) -> int:
    if argv is not None and len(argv) == 2 and argv[0].endswith(".pkl"):  # subprocess side of run_worker
        import pickle

        with open(argv[0], "rb") as f:
            job = pickle.load(f)
        result = run_verbose(job["cases"])
        with open(argv[1], "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        return 0
    ap = argparse.ArgumentParser(prog="python -m safeobs.kernels.record", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for cases_<family>.npz and host.json")
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="directory with the input cases_<family>.npz")
    args = ap.parse_args(argv)
    try:
        host = record(args.out, args.cases)
    except (ValueError, RuntimeError) as e:
        print(f"safeobs record: {e}", file=sys.stderr)
        return 2
    print(json.dumps(host, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
