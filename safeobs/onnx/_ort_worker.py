"""Subprocess worker: run ONNX models with onnxruntime (natively or under ``qemu-x86_64 -cpu Haswell``).

Run as a script (``python _ort_worker.py IN OUT``), not as ``-m safeobs...``, so the interpreter
imports only numpy and onnxruntime (no torch: ~11 s under qemu).  IN is a pickle of
``{"runs": [{"model": bytes, "feeds": {name: array}, "config": {key: value}, "threads": int}]}``;
OUT receives a list with one list of output arrays per run (or the error text).
"""

import pickle
import sys


def _session(ort, model: bytes, config: dict, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        if key == "graph_optimization_level":
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        else:
            so.add_session_config_entry(key, str(value))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _load(name):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        f"_safeobs_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_plan(ort, run):
    runner, emulator, cache, outs, nsat = _load("_plan_runner"), _load("emulator"), {}, [], 0
    for feeds in run["feeds"]:
        y, n = runner.run_plan(ort, emulator, run["plan"], feeds, run["isa"], cache)
        outs.append(y)
        nsat += n
    return [outs, nsat]


def main(src: str, dst: str) -> None:
    import onnxruntime as ort

    with open(src, "rb") as f:
        job = pickle.load(f)
    results = []
    for run in job["runs"]:
        try:
            if "plan" in run:  # a whole-model emulation plan (safeobs.onnx.modelemu)
                results.append(_run_plan(ort, run))
                continue
            sess = _session(ort, run["model"], run.get("config"), run.get("threads", 1))
            feeds = run["feeds"]
            if isinstance(feeds, dict):
                results.append(sess.run(None, feeds))
            else:  # several feeds through one session
                results.append([sess.run(None, fd) for fd in feeds])
        except Exception as e:  # reported per run; the caller decides
            results.append(f"{type(e).__name__}: {e}")
    with open(dst, "wb") as f:
        pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
