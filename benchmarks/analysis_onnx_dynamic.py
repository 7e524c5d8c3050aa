"""Where MiniLM's error goes under ORT ``quantize_dynamic(per_channel=True)``: per-layer output SQNR on held-out data.

For every weight MatMul of all-MiniLM-L6-v2 (exported as in bench_onnx.py), on the held-out sentences (one ORT run
of 36 sentences, real tokens only): the layer's output ``x @ w_hat`` against the float ``x @ w``, for ORT's own
codes, safeobs RTN (safe scales) and safeobs data-aware (calibration draw 0 of bench_onnx.py), once with the
float input (weight error alone) and once with the input ORT's ``DynamicQuantizeLinear`` really gives the
MatMul (``so.dynamic_quantize``).  Also: the calibration objective ratio (data-aware / RTN, in sample), how many
channels keep RTN, and how many channels have a safe scale above ORT's.  Prints markdown (quoted in docs/onnx.md).

Run: ``PYTHONPATH=. python benchmarks/analysis_onnx_dynamic.py``
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import bench_onnx as B  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import quantize_dynamic  # noqa: E402

from safeobs import data  # noqa: E402
from safeobs import onnx as so  # noqa: E402
from safeobs.kernels import realkernel  # noqa: E402


def db(sig, err) -> float:
    return float(10 * np.log10(sig / err))


def main():
    tmp = Path(tempfile.mkdtemp(prefix="onnx-dyn-"))
    fp = tmp / "minilm.onnx"
    tok = B.export_minilm(fp)
    calib, held = data.sentences("calib"), data.sentences("heldout")
    sub = [calib[i] for i in B.draw_subset(len(calib), 0)]
    cal = [B.minilm_feeds(tok, sub[i : i + 8]) for i in range(0, len(sub), 8)]
    quantize_dynamic(str(fp), str(tmp / "ort.onnx"), per_channel=True)
    so.quantize_dynamic(str(fp), str(tmp / "rtn.onnx"), per_channel=True)
    rep = so.quantize_dynamic(str(fp), str(tmp / "da.onnx"), per_channel=True, calibration_data_reader=B.Reader(cal))

    feeds = B.minilm_feeds(tok, held)
    mask = feeds["attention_mask"].astype(bool)
    m = onnx.load(str(fp))
    cons, _ = so._stat_consumers(m)
    acts = sorted({a for u in cons.values() for a, _, _ in u})
    mm = onnx.ModelProto()
    mm.CopyFrom(m)
    for a in acts:
        mm.graph.output.append(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None))
    vals = dict(
        zip(acts, ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(acts, feeds))
    )
    w_float = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    q = {
        n: {w.codes_name[: -len("_quantized")]: w for w in so.read_weights(str(tmp / f"{n}.onnx"))}
        for n in ("ort", "rtn", "da")
    }
    tot = {n: np.zeros(3) for n in q}
    raised = chans = 0
    print(
        f"Host: {realkernel.cpu_name()} (numpy float64 from the written codes and scales: the exact integer result, "
        f"no int8 kernel runs); onnxruntime {ort.__version__}; calibration draw 0 ({sum(f['input_ids'].size for f in cal)} rows, "
        f"{int(sum(f['attention_mask'].sum() for f in cal))} real tokens); {len(held)} held-out sentences ({int(mask.sum())} tokens).\n"
    )
    print(
        "| layer (weight) | K | weight only: ORT / RTN / data-aware (dB) | with dynamic u8 input: ORT / RTN / data-aware (dB) |"
    )
    print("|---|---|---|---|")
    for name, use in cons.items():
        x = vals[use[0][0]]
        xf, xq = x[mask], so.dynamic_quantize(x)[mask]
        y = xf.astype(np.float64) @ w_float[name].astype(np.float64)
        sig = float((y**2).sum())
        cells = []
        for n, ws in q.items():
            wd = ws[name].codes.astype(np.float64) * ws[name].scale.astype(np.float64).reshape(1, -1)
            e1, e2 = float(((xf @ wd - y) ** 2).sum()), float(((xq @ wd - y) ** 2).sum())
            tot[n] += (e1, e2, sig)
            cells.append((db(sig, e1), db(sig, e2)))
        raised += int(np.sum(q["rtn"][name].scale > q["ort"][name].scale))
        chans += q["rtn"][name].scale.size
        print(
            f"| {name} | {w_float[name].shape[0]} | "
            + " / ".join(f"{c[0]:.2f}" for c in cells)
            + " | "
            + " / ".join(f"{c[1]:.2f}" for c in cells)
            + " |"
        )
    print(
        "| **all layers** | | "
        + " / ".join(f"**{db(t[2], t[0]):.2f}**" for t in tot.values())
        + " | "
        + " / ".join(f"**{db(t[2], t[1]):.2f}**" for t in tot.values())
        + " |"
    )
    err = sum(e.sum() for e, _ in rep.rounded.values())
    rtn = sum(r.sum() for _, r in rep.rounded.values())
    keep = sum(int(np.sum(e >= r)) for e, r in rep.rounded.values())
    print(
        f"\nData-aware weights {len(rep.rounded)}, fallbacks {len(rep.fallbacks)}, channels {chans}, keeping RTN {keep}; "
        f"calibration objective data-aware / RTN {err / rtn:.3f} ({db(rtn, err):.1f} dB in sample); "
        f"channels whose safe scale is above ORT's: {raised} ({raised / chans:.0%}); biases corrected {len(rep.bias_corrected)}."
    )


if __name__ == "__main__":
    main()
