"""Subprocess worker: run OpenVINO models on the CPU plugin (natively, ISA-forced, or under qemu Haswell).

Run as a script (``python _worker.py IN OUT``) so the interpreter imports only numpy and openvino (no torch,
no safeobs).  IN is a pickle of ``{"runs": [{"xml": bytes, "bin": bytes, "feeds": [inputs, ...],
"config": {key: value}}]}``; each item of ``feeds`` is one array (or a list of arrays, one per model input).
OUT receives one ``{"outputs": [[arrays] per feed], "runtime": [(name, layerType, primitiveType,
runtimePrecision), ...], "isa": str}`` per run, or the error text.
"""

import pickle
import sys

import numpy as np

DEFAULT_CONFIG = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}


def _runtime(compiled):
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        rows.append(
            (op.get_friendly_name(),)
            + tuple(rt[k].astype(str) if k in rt else "" for k in ("layerType", "primitiveType", "runtimePrecision"))
        )
    return rows


def main(src: str, dst: str) -> None:
    import openvino as ov

    with open(src, "rb") as f:
        job = pickle.load(f)
    core = ov.Core()
    results = []
    for run in job["runs"]:
        try:
            model = core.read_model(run["xml"].decode(), ov.Tensor(np.frombuffer(run["bin"], np.uint8).copy()))
            config = dict(DEFAULT_CONFIG, **(run.get("config") or {}))
            compiled = core.compile_model(model, "CPU", config)
            req = compiled.create_infer_request()
            outs = []
            for feed in run["feeds"]:
                feed = list(feed) if isinstance(feed, (list, tuple)) else [feed]
                res = req.infer(feed)
                outs.append([np.array(res[o]) for o in compiled.outputs])
            results.append({"outputs": outs, "runtime": _runtime(compiled)})
        except Exception as e:  # reported per run; the caller decides
            results.append(f"{type(e).__name__}: {e}")
    with open(dst, "wb") as f:
        pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
