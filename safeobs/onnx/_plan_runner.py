"""Run a whole-model emulation plan (:mod:`safeobs.onnx.modelemu`): ORT for everything but the integer
GEMM/conv nodes, :mod:`safeobs.onnx.emulator` for those.

Imports only numpy (and takes ``ort`` and the emulator module as arguments), so that the qemu worker
(``_ort_worker.py``, run as a plain script) can use it without importing safeobs or torch.
"""

import numpy as np


def _sessions(ort, plan, cache):
    key = id(plan)
    if key not in cache:
        sessions = []
        for step in plan["steps"]:
            o = ort.SessionOptions()
            o.intra_op_num_threads = plan.get("threads", 1)
            o.inter_op_num_threads = 1
            o.log_severity_level = 3
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph is ORT's optimized one
            sessions.append(
                ort.InferenceSession(step["segment"], o, providers=["CPUExecutionProvider"])
                if step["segment"] is not None
                else None
            )
        cache[key] = sessions
    return cache[key]


def run_plan(ort, E, plan, feeds, isa, cache=None):
    """``(outputs, saturated lanes)``: the model's outputs with the integer nodes emulated on ``isa``."""
    sessions = _sessions(ort, plan, {} if cache is None else cache)
    vals = dict(feeds)
    nsat = 0
    for step, sess in zip(plan["steps"], sessions):
        if sess is not None:
            need = {n: vals[n] for n in step["inputs"]}
            vals.update(zip(step["outputs"], sess.run(step["outputs"], need)))
        node = step.get("node")
        if node is None:
            continue
        args = [None if n is None else (vals[n] if n in vals else node["consts"][n]) for n in node["inputs"]]
        y = getattr(E, node["op"])(*args, isa=isa, **node["kwargs"])
        nsat += E.saturation_count()
        vals[node["output"]] = y
    return [np.asarray(vals[n]) for n in plan["outputs"]], nsat
