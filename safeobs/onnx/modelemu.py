"""Whole-model AVX2 emulation of an ONNX Runtime int8 model: what an AVX2-only CPU computes, on any host.

:func:`build_plan` takes ORT's own optimized graph of the model (the fused QLinearConv / QGemm /
DynamicQuantizeMatMul / ... nodes its CPU EP runs, saved at ``ORT_ENABLE_EXTENDED``) and cuts it at every
integer GEMM / conv node with an int8 weight initializer.  :func:`run` then executes the pieces in
between with ONNX Runtime and those nodes with :mod:`safeobs.onnx.emulator` (bit-exact MLAS U8S8, int16
saturation included) for the ISA asked: ``isa="avx2"`` gives an AVX2-only CPU's integer results on a
VNNI host, ``isa="vnni"`` the exact ones.  Float ops are those of the CPU the pieces run on (this host,
or an AVX2 CPU with ``mode="haswell"``: the whole plan under ``qemu-x86_64 -cpu Haswell``, to compare
bit for bit with the real AVX2 kernels).

Depthwise QLinearConv (exact on every ISA) and nodes with u8 or non-constant weights stay in ORT; a node
the emulator cannot model (``auto_pad``, weights that are not 2-D for a GEMM) stays in ORT too and is
listed in ``plan["not_emulated"]`` (it runs with this host's kernels).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from . import require
from .ortkernel import MODES, available

# op -> index of its weight input
EMULATED = {
    "MatMulInteger": 1,
    "MatMulIntegerToFloat": 1,
    "DynamicQuantizeMatMul": 1,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "QLinearConv": 3,
}
_ORT_TYPES = {
    "tensor(float)": 1,
    "tensor(uint8)": 2,
    "tensor(int8)": 3,
    "tensor(int32)": 6,
    "tensor(int64)": 7,
    "tensor(bool)": 9,
    "tensor(float16)": 10,
    "tensor(double)": 11,
}


def _optimized(model):
    onnx, ort = require()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "opt.onnx")
        o = ort.SessionOptions()
        o.log_severity_level = 3
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        o.optimized_model_filepath = out
        ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
        return onnx.load(out)


def _emulation_spec(node, consts) -> tuple[dict | None, str | None]:
    """``(kwargs, None)`` for a node the emulator runs, ``(None, reason)`` for one it leaves to ORT."""
    onnx, _ = require()
    wi = EMULATED.get(node.op_type)
    if wi is None or len(node.input) <= wi:
        return None, None
    w = consts.get(node.input[wi])
    if w is None or w.dtype != np.int8:
        return None, None  # u8 weights (exact) or computed weights: ORT
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if node.op_type == "QLinearConv":
        g = int(a.get("group", 1))
        if w.shape[1] == 1 and w.shape[0] == g:
            return None, None  # depthwise: exact on every ISA
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None, f"auto_pad={a['auto_pad']!r}"
        return {k: a[k] for k in ("strides", "pads", "dilations") if k in a} | {"group": g}, None
    if w.ndim != 2:
        return None, f"{w.ndim}-D weight"
    if node.op_type == "QGemm":
        return {k: a[k] for k in ("alpha", "transA", "transB") if k in a}, None
    return {}, None


def build_plan(model, *, threads: int = 1) -> dict:
    """The emulation plan of a quantized model (path or ``ModelProto``); picklable, see :func:`run`."""
    onnx, ort = require()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    opt = _optimized(model)
    g = opt.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n: onnx.numpy_helper.to_array(t) for n, t in inits.items()}
    producer = {o: n for n in g.node for o in n.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    known = [i.name for i in g.input if i.name not in inits]
    known_set = set(known)
    raw_steps, not_emulated = [], []

    def closure(want):
        nodes, ins, stack, seen = [], [], list(want), set()
        while stack:
            t = stack.pop()
            if not t or t in inits:
                continue
            if t in known_set:
                if t not in ins:
                    ins.append(t)
                continue
            p = producer[t]
            if id(p) in seen:
                continue
            seen.add(id(p))
            nodes.append(p)
            stack.extend(p.input)
        return sorted(nodes, key=lambda n: order[id(n)]), ins

    def segment(want):
        want = [t for t in dict.fromkeys(want) if t and t not in inits and t not in known_set]
        if not want:
            return None
        nodes, ins = closure(want)
        used = {x for n in nodes for x in n.input}
        return {"nodes": nodes, "inputs": ins, "outputs": want, "inits": [inits[x] for x in used if x in inits]}

    for node in g.node:
        kwargs, why = _emulation_spec(node, consts)
        if why is not None:
            not_emulated.append(f"{node.name or node.op_type}: {why}")
        if kwargs is None:
            continue
        seg = segment(node.input)
        if seg is not None:
            known.extend(seg["outputs"])
            known_set.update(seg["outputs"])
        spec = {
            "op": node.op_type,
            "inputs": [x or None for x in node.input],
            "consts": {x: consts[x] for x in node.input if x in consts},
            "kwargs": kwargs,
            "output": node.output[0],
        }
        raw_steps.append((seg, spec))
        known.append(node.output[0])
        known_set.add(node.output[0])
    outputs = [o.name for o in g.output]
    raw_steps.append((segment(outputs), None))

    # value types of every tensor a segment takes as input, from ORT itself
    typed = onnx.ModelProto()
    typed.CopyFrom(opt)
    have = {o.name for o in typed.graph.output}
    for t in known:
        if t not in have:
            typed.graph.output.append(onnx.ValueInfoProto(name=t))
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(typed.SerializeToString(), o, providers=["CPUExecutionProvider"])
    types = {v.name: _ORT_TYPES[v.type] for v in list(sess.get_outputs()) + list(sess.get_inputs())}

    steps = []
    for seg, spec in raw_steps:
        blob = None
        if seg is not None:
            h = onnx.helper
            graph = h.make_graph(
                seg["nodes"],
                "segment",
                [h.make_tensor_value_info(t, types[t], None) for t in seg["inputs"]],
                [onnx.ValueInfoProto(name=t) for t in seg["outputs"]],
                initializer=seg["inits"],
            )
            m = h.make_model(graph, opset_imports=list(opt.opset_import))
            m.ir_version = opt.ir_version
            blob = m.SerializeToString()
        steps.append(
            {
                "segment": blob,
                "inputs": seg["inputs"] if seg else [],
                "outputs": seg["outputs"] if seg else [],
                "node": spec,
            }
        )
    return {
        "steps": steps,
        "outputs": outputs,
        "threads": threads,
        "emulated": [s["node"]["op"] for s in steps if s["node"]],
        "not_emulated": not_emulated,
    }


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_safeobs_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(plan: dict, feeds, isa: str = "avx2", *, mode: str = "native", timeout: float = 3600.0):
    """Outputs of the planned model for ``feeds`` (a dict, or a list of dicts: one output list each) with
    its integer nodes emulated on ``isa``; ``mode="haswell"`` runs the whole plan under qemu Haswell.
    Returns ``(outputs, saturated int16 lanes)``, summed over the feeds."""
    from . import emulator as E

    E._check_isa(isa)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    many = isinstance(feeds, (list, tuple))
    batch = list(feeds) if many else [feeds]
    if mode == "haswell":
        from .ortkernel import run as run_sub

        if not available(mode):
            raise RuntimeError("qemu-x86_64 is not available on this host")
        res = run_sub([{"plan": plan, "feeds": batch, "isa": isa}], mode=mode, timeout=timeout)[0]
        outs, nsat = res
    else:
        _, ort = require()
        runner, cache, outs, nsat = _load("_plan_runner"), {}, [], 0
        for f in batch:
            y, n = runner.run_plan(ort, E, plan, f, isa, cache)
            outs.append(y)
            nsat += n
    return (outs if many else outs[0]), nsat
