"""``safeobs audit model.onnx`` and ``safeobs repair model.onnx -o safe.onnx`` (ONNX Runtime models).

audit: per integer node, the MLAS kernel ORT runs on each x86 ISA (:func:`safeobs.onnx.kernel_for`)
and how many output channels hold a weight pair that kernel can saturate; with sample inputs
(``--inputs x.npz``: one array per graph input) the node inputs are captured from ORT and the
emulator (:mod:`safeobs.onnx.emulator`) counts the int16 lanes that saturate on AVX2 / AVX-512.

repair: re-quantizes only the unsafe channels at the tightest safe scale (from the dequantized
weights, no data needed), re-scales their int32 biases (QLinearConv ``B``, QDQ bias
DequantizeLinear), and leaves every other initializer, node and attribute untouched.
"""

from __future__ import annotations

import numpy as np

from .. import onnx as so

SAT_ISAS = ("avx2", "avx512")


def _load(path: str):
    onnx, _ = so.require()
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001 - any parse error is a usage error
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def _unique(weights):
    seen, out = set(), []
    for qw in weights:
        if qw.codes_name not in seen:
            seen.add(qw.codes_name)
            out.append(qw)
    return out


def audit_model(model, inputs: dict | None = None, x64quantprecision: bool = False) -> dict:
    weights = so.read_weights(model)
    rows = []
    for qw in weights:
        cells = {}
        unsafe_ch = so.pair_violations(qw.codes, qw.role, qw.axis, "ort") if qw.codes.dtype == np.int8 else []
        for isa in so.ISAS:
            kernel, sat = qw.kernel(isa, x64quantprecision)
            cells[isa] = {"kernel": kernel, "saturates": sat, "unsafe_channels": int(len(unsafe_ch)) if sat else 0}
        rows.append(
            {
                "node": qw.node,
                "op": qw.op_type,
                "weight": qw.codes_name,
                "shape": list(qw.codes.shape),
                "activation": qw.act_dtype,
                "cells": cells,
            }
        )
    if inputs is not None:
        counts = emulate_saturation(model, weights, inputs)
        for row, c in zip(rows, counts):
            for isa in so.ISAS:
                row["cells"][isa]["saturated_lanes"] = c.get(isa, 0) if row["cells"][isa]["saturates"] else 0
    unsafe = [
        r["node"] for r in rows if any(c["unsafe_channels"] or c.get("saturated_lanes", 0) for c in r["cells"].values())
    ]
    return {"nodes": rows, "unsafe": unsafe}


def _act_tensors(model, weights):
    """Name of the quantized activation tensor (and its zero point name) feeding each weight's node."""
    g = model.graph
    by_name = {n.name: n for n in g.node}
    producers = {o: n for n in g.node for o in n.output}
    out = []
    for i, qw in enumerate(weights):
        node = (
            by_name.get(qw.node)
            or [
                n
                for n in g.node
                if qw.codes_name in n.input
                or any(producers.get(x) is not None and qw.codes_name in producers[x].input for x in n.input)
            ][0]
        )
        t = node.op_type
        if t in ("QLinearConv", "QLinearMatMul", "QGemm"):
            out.append((node.input[0], node.input[2], False))
        elif t in ("MatMulInteger", "ConvInteger"):
            out.append((node.input[0], node.input[2] if len(node.input) > 2 else None, False))
        elif t == "MatMulIntegerToFloat":
            out.append((node.input[0], node.input[4] if len(node.input) > 4 else None, False))
        elif t == "DynamicQuantizeMatMul":
            out.append((node.input[0], None, True))
        else:  # QDQ: the activation DequantizeLinear's quantized input
            p = producers.get(node.input[0])
            if p is not None and p.op_type == "DequantizeLinear":
                out.append((p.input[0], p.input[2] if len(p.input) > 2 else None, False))
            else:
                out.append((None, None, False))
    return out


def _run_capture(model, names: list[str], inputs: dict) -> dict:
    onnx, ort = so.require()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing and n not in inits:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    so_ = ort.SessionOptions()
    so_.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so_, providers=["CPUExecutionProvider"])
    want = [n for n in names if n not in inits]
    vals = dict(zip(want, sess.run(want, inputs)))
    for i in m.graph.initializer:
        if i.name in names:
            vals[i.name] = onnx.numpy_helper.to_array(i)
    return vals


def emulate_saturation(model, weights, inputs: dict) -> list[dict]:
    """Per weight: saturated int16 lanes per ISA for the captured activations (emulated)."""
    from . import emulator as E

    acts = _act_tensors(model, weights)
    names = sorted({n for a, z, _ in acts for n in (a, z) if n})
    vals = _run_capture(model, names, inputs)
    counts = []
    for qw, (a, z, dynamic) in zip(weights, acts):
        c = {}
        if a is None or a not in vals or qw.codes.dtype != np.int8:
            counts.append(c)
            continue
        x = vals[a]
        if dynamic:
            x, _, zp = E.DynamicQuantizeLinear(x)
        else:
            zp = vals.get(z, np.zeros((), x.dtype)) if z else np.zeros((), x.dtype)
        if x.dtype == np.int8:  # QDQ s8 activations run as u8 (x + 128) on x86
            x = (x.astype(np.int16) + 128).astype(np.uint8)
            zp = np.uint8(int(zp) + 128)
        wz = qw.zero_point if qw.zero_point is not None else np.zeros((), np.int8)
        for isa in SAT_ISAS:
            if not qw.kernel(isa)[1]:
                continue
            if qw.role.kind == "conv":
                at = qw.conv_attrs
                E._conv_acc(
                    x,
                    qw.codes,
                    zp,
                    wz,
                    at.get("strides"),
                    at.get("pads"),
                    at.get("dilations"),
                    at.get("group", 1),
                    True,
                )
            else:
                b = qw.codes.T if qw.role.kind == "gemm_t" else qw.codes
                E.MatMulInteger(x, b, zp, wz.reshape(-1) if np.size(wz) > 1 else wz, isa=isa)
            c[isa] = E.saturation_count()
        counts.append(c)
    return counts


def format_audit(result: dict, only_unsafe: bool = False) -> str:
    head = ["node", "op", "weight", "act"] + [f"ort/{i}" for i in so.ISAS]
    rows = []
    for r in result["nodes"]:
        if only_unsafe and r["node"] not in result["unsafe"]:
            continue
        cells = []
        for isa in so.ISAS:
            c = r["cells"][isa]
            if not c["saturates"]:
                cells.append(f"{c['kernel']}:exact")
            else:
                s = f"{c['kernel']}:{c['unsafe_channels'] or 'ok'}"
                if "saturated_lanes" in c:
                    s += f" ({c['saturated_lanes']} sat)"
                cells.append(s)
        rows.append([r["node"], r["op"], "x".join(map(str, r["shape"])), r["activation"]] + cells)
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, width)).rstrip() for line in [head] + rows]
    n = len(result["nodes"])
    if result["unsafe"]:
        lines.append(
            f"UNSAFE: {len(result['unsafe'])} of {n} integer nodes can saturate: "
            + ", ".join(result["unsafe"][:8])
            + (", ..." if len(result["unsafe"]) > 8 else "")
        )
    else:
        lines.append(f"OK: none of {n} integer nodes can saturate on any x86 CPU")
    return "\n".join(lines)


# -- repair --------------------------------------------------------------------------------------


def _set_init(model, name: str, array: np.ndarray) -> None:
    onnx, _ = so.require()
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            new = onnx.numpy_helper.from_array(np.asarray(array).astype(dtype).reshape(tuple(init.dims)), name)
            model.graph.initializer[i].CopyFrom(new)
            return
    raise KeyError(name)


def _bias_of(model, qw):
    """``(int32 bias name, bias scale name or None)`` of a QLinearConv / QDQ Conv, else None."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type == "QLinearConv" and len(n.input) > 8 and n.input[3] == qw.codes_name and n.input[8] in inits:
            return n.input[8], None
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            pw, pb = producers.get(n.input[1]), producers.get(n.input[2])
            if (
                pw is not None
                and pw.input[0] == qw.codes_name
                and pb is not None
                and pb.op_type == "DequantizeLinear"
                and pb.input[0] in inits
            ):
                return pb.input[0], pb.input[1]
    return None


def repair_model(model, layout: str = "ort") -> list[dict]:
    """Re-quantize, in place, only the channels of ``model`` whose weight pairs can saturate."""
    onnx, _ = so.require()
    infos = []
    arr = {i.name: i for i in model.graph.initializer}
    for qw in _unique(so.read_weights(model)):
        info = {
            "weight": qw.codes_name,
            "node": qw.node,
            "op": qw.op_type,
            "changed": 0,
            "channels": 1 if qw.axis is None else int(qw.codes.shape[qw.axis]),
        }
        infos.append(info)
        if qw.codes.dtype != np.int8 or not qw.kernel("avx2")[1] and not qw.kernel("avx512")[1]:
            continue
        bad = so.pair_violations(qw.codes, qw.role, qw.axis, layout)
        if bad.size == 0:
            continue
        if qw.scale is None:
            info["error"] = "no scale initializer found; left unchanged"
            continue
        zp = qw.zero_point if qw.zero_point is not None else np.zeros(qw.scale.shape, np.int8)
        shape = [1] * qw.codes.ndim
        if qw.axis is not None:
            shape[qw.axis] = -1
        wf = (
            (qw.codes.astype(np.float32) - np.asarray(zp, np.float32).reshape(shape))
            * np.asarray(qw.scale, np.float32).reshape(shape)
        ).astype(np.float32)
        s, z, codes = so.safe_weight_params(
            wf, qw.role, qw.scale, zp, qw.axis, symmetric=bool(np.all(zp == 0)), layout=layout
        )
        old_s = np.asarray(qw.scale, np.float32).reshape(-1)
        keep = np.ones(old_s.size, bool)
        keep[bad] = False
        s = np.where(keep, old_s, s).astype(np.float32)
        z = np.where(keep, np.asarray(zp).reshape(-1), z.reshape(-1))
        if qw.axis is None:
            new_codes = codes
        else:
            sel = np.moveaxis(np.broadcast_to(keep.reshape(shape), qw.codes.shape), 0, 0)
            new_codes = np.where(sel, qw.codes, codes).astype(np.int8)
        _set_init(model, qw.codes_name, new_codes)
        _set_init(model, qw.scale_name, s.reshape(qw.scale.shape))
        if qw.zp_name is not None and qw.zero_point is not None:
            _set_init(model, qw.zp_name, z.reshape(qw.zero_point.shape))
        bias = _bias_of(model, qw)
        if bias is not None:
            b = onnx.numpy_helper.to_array(arr[bias[0]]).astype(np.float64)
            ratio = (old_s / s).astype(np.float64)
            _set_init(model, bias[0], np.rint(b * (ratio if b.size == ratio.size else ratio[0])).astype(np.int32))
            if bias[1] is not None:
                bs = onnx.numpy_helper.to_array(arr[bias[1]]).astype(np.float64)
                _set_init(model, bias[1], (bs / (ratio if bs.size == ratio.size else ratio[0])).astype(np.float32))
        ref = wf
        deq = (new_codes.astype(np.float32) - np.asarray(z, np.float32).reshape(shape)) * s.reshape(shape)
        info.update(
            changed=int(bad.size),
            bits_lost=float(np.mean(np.log2(s[bad] / old_s[bad]))),
            weight_sqnr=float(
                10
                * np.log10(
                    np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - deq).astype(np.float64) ** 2), 1e-30)
                )
            ),
        )
    return infos


def format_repair(infos: list[dict], only_changed: bool = True) -> str:
    lines = [f"{'weight':40s} {'op':22s} changed   bits lost  weight SQNR"]
    for i in infos:
        if only_changed and not i["changed"] and "error" not in i:
            continue
        if "error" in i:
            lines.append(f"{i['weight'][:40]:40s} {i['op']:22s} {i['error']}")
            continue
        bl = f"{i.get('bits_lost', 0):9.2f}" if i["changed"] else "        -"
        sq = f"{i['weight_sqnr']:8.1f} dB" if i["changed"] else "        -"
        lines.append(f"{i['weight'][:40]:40s} {i['op']:22s} {i['changed']:>3}/{i['channels']:<4} {bl}  {sq}")
    n = sum(1 for i in infos if i["changed"])
    lines.append(f"{n} of {len(infos)} weights re-quantized")
    return "\n".join(lines)


# -- CLI entry points (called by safeobs.cli for *.onnx) ------------------------------------------


def _inputs(path: str | None, scale: float) -> dict | None:
    if path is None:
        return None
    try:
        with np.load(path) as z:
            feeds = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--inputs {path}: not a readable .npz of graph inputs ({e})") from None
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def cmd_audit(args, dump) -> int:
    model = _load(args.model)
    if getattr(args, "photos", None):
        raise ValueError("--photos is for torch models; give ONNX graph inputs with --inputs FILE.npz")
    try:
        result = audit_model(model, _inputs(args.inputs, args.input_scale))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT errors on bad inputs
        raise ValueError(
            f"{args.model}: cannot run the model on --inputs ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not result["nodes"]:
        raise ValueError(f"{args.model}: no integer node with int8/uint8 weights (is it quantized?)")
    result["model"] = args.model
    print(dump(result) if args.json else format_audit(result, only_unsafe=args.unsafe_only))
    return 1 if result["unsafe"] else 0


def cmd_repair(args, dump) -> int:
    onnx, _ = so.require()
    model = _load(args.model)
    layout = args.layout
    infos = repair_model(model, layout)
    if not infos:
        raise ValueError(f"{args.model}: no integer node with int8/uint8 weights (is it quantized?)")
    try:
        onnx.save(model, args.output)
    except OSError as e:
        raise ValueError(f"{args.output}: cannot write ({e.strerror or e})") from None
    if args.json:
        print(dump({"model": args.model, "output": args.output, "layout": layout, "weights": infos}))
    else:
        print(format_repair(infos, only_changed=not args.all))
        print(f"saved ONNX model to {args.output}")
    return 0
