"""Audit and repair of OpenVINO IR (``safeobs audit|repair model.xml``).

An IR is XML + a weights blob: loading it runs no code, so no trust flag is needed.  :func:`audit_model` lists
per int8 weight node the kernel the CPU plugin runs on avx2 / avx512 / vnni and the output channels whose
code pairs can saturate there (pairs measured by pair discovery, :mod:`.kernel`).  With sample inputs
(``--inputs x.npz``: one array per model input) the model runs on the CPU plugin with every int8 node's
input as an extra output (:mod:`.capture`), and :mod:`.emulator` counts the int16 lanes that saturate on
avx2 and avx512 for those activation codes (:func:`emulate_saturation`).  :func:`repair_ir`
re-quantizes only the unsafe channels (tightest safe scale, layout ``"openvino"``) and writes the new codes
and scales into a copy of the ``.bin`` at their own offsets: the XML and every other byte stay identical
(a Constant whose bytes are shared with another one goes to the end of the blob instead and only its
``offset`` attribute changes).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from . import capture
from . import emulator as E
from ._deps import require_openvino
from .weights import (
    ISAS,
    find_activation_matmuls,
    isa_kernel,
    kernel_columns,
    read_weights,
    safe_codes,
    unsafe_channels,
)

SAT_ISAS = ("avx2", "avx512")

DEFAULT_LAYOUT = "openvino"  # safeobs repair MODEL.xml: the OpenVINO CPU plugin pairing

ACT_MATMUL_KIND = (
    "activation x activation MatMul, no weight: cannot be made safe by weights; keep it in float (ignored_scope)"
)
# probed on the real plugin (tests/test_openvino.py::test_activation_matmul_kernels): both inputs at +max, K = 64
ACT_MATMUL_KERNEL = {"avx2": "jit_gemm_i8", "avx512": "brgemm_avx512_i8", "vnni": "brgemm_avx512_i8 (VNNI)"}
ACT_MATMUL_SATURATES = {"avx2": True, "avx512": True, "vnni": False}
FQ_WEIGHT_KIND = "weight kept as a FakeQuantize (not int8 Constants): its codes are not audited"
_PASS = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Convert")  # between a FakeQuantize and its consumer


def _fake_quantize(output):
    """The 8-bit (<= 256 levels) FakeQuantize behind ``output`` through value-preserving ops, or None."""
    src = output.get_node()
    while src.get_type_name() in _PASS:
        src = src.input_value(0).get_node()
    if src.get_type_name() == "FakeQuantize" and int(src.get_attributes()["levels"]) <= 256:
        return src
    return None


def activation_matmuls(model) -> list[dict]:
    """Int8 MatMuls whose two inputs are both activations (both 8-bit FakeQuantize'd, no constant weight): the
    plugin runs them on a gemm that pairs activation codes in saturating int16 on avx2 and avx512 (not VNNI)."""
    out = []
    for op in find_activation_matmuls(model):
        if all(_fake_quantize(op.input_value(i)) is not None for i in range(2)):
            out.append(
                {
                    "name": op.get_friendly_name(),
                    "op": "MatMul",
                    "kind": ACT_MATMUL_KIND,
                    "kernel": dict(ACT_MATMUL_KERNEL),
                    "can_saturate": dict(ACT_MATMUL_SATURATES),
                }
            )
    return out


def fq_weights(model) -> list[dict]:
    """Convolution / GroupConvolution / MatMul nodes whose weight is a FakeQuantize of a constant (not NNCF's
    int8 Constants) and whose activation is FakeQuantize'd too: the plugin folds both into int8 (the weight's
    codes are not read here: ``can_saturate`` is reported conservatively on avx2 and avx512)."""
    from .weights import WEIGHT_OPS, _constant_names

    ops = model.get_ordered_ops()
    const = _constant_names(ops)
    out = []
    for op in ops:
        if op.get_type_name() not in WEIGHT_OPS or op.get_input_size() < 2:
            continue
        w = _fake_quantize(op.input_value(1))
        if w is None or w.input_value(0).get_node().get_name() not in const:
            continue
        if _fake_quantize(op.input_value(0)) is None:
            continue
        out.append(
            {
                "name": op.get_friendly_name(),
                "op": op.get_type_name(),
                "kind": FQ_WEIGHT_KIND,
                "kernel": dict.fromkeys(ISAS, "int8 (not probed)"),
                "can_saturate": {"avx2": True, "avx512": True, "vnni": False},
            }
        )
    return out


def load_ir(path: str):
    """``ov.Model`` of ``path`` (.xml with its .bin); ValueError for a missing or unreadable file."""
    ov = require_openvino()
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if not os.path.isfile(os.path.splitext(path)[0] + ".bin"):
        raise ValueError(f"{path}: its weights file {os.path.splitext(path)[0] + '.bin'} is missing")
    try:
        return ov.Core().read_model(path)
    except Exception as e:  # noqa: BLE001 - OpenVINO's parse errors
        raise ValueError(f"{path}: not a readable OpenVINO IR ({type(e).__name__}: {str(e).strip()[:200]})") from None


def audit_model(model, inputs=None) -> dict:
    """Per int8 weight node: kernels and unsafe output channels on avx2 / avx512 / vnni; with ``inputs`` (an
    iterable of feeds, see :func:`emulate_saturation`) also ``saturated_lanes`` per ISA."""
    weights = read_weights(model)
    nodes = []
    for qw in weights:
        bad = {isa: unsafe_channels(qw, isa).tolist() for isa in ISAS}
        nodes.append(
            {
                "name": qw.name,
                "op": qw.op_type,
                "shape": list(qw.codes.shape),
                "int8": qw.int8,
                "kernel": {isa: isa_kernel(qw, isa) for isa in ISAS},
                "unsafe_channels": bad,
                "channels": int(qw.view(qw.codes).shape[0]),
            }
        )
    if inputs is not None:
        counts = emulate_saturation(model, inputs, weights)
        for n in nodes:
            c = counts.get(n["name"])
            n["saturated_lanes"] = None if c is None else {isa: c.get(isa, 0) for isa in ISAS}
    unweighted = activation_matmuls(model) + fq_weights(model)
    unsafe = any(any(n["unsafe_channels"].values()) or any((n.get("saturated_lanes") or {}).values()) for n in nodes)
    unsafe = unsafe or any(any(n["can_saturate"].values()) for n in unweighted)
    return {"nodes": nodes, "unweighted": unweighted, "unsafe": unsafe}


def _conv_args(node) -> dict:
    """strides / pads / dilations of an OpenVINO (Group)Convolution, explicit pads resolved by the node."""
    a = node.get_attributes()
    nd = len(a["strides"])
    pb, pe = list(a.get("pads_begin", [0] * nd)), list(a.get("pads_end", [0] * nd))
    if str(a.get("auto_pad", "explicit")).lower() == "valid":
        pb, pe = [0] * nd, [0] * nd
    return dict(strides=list(a["strides"]), pads_begin=pb, pads_end=pe, dilations=list(a["dilations"]))


def emulate_node(qw, x: np.ndarray, fq, isa: str) -> int:
    """Saturated int16 lanes of weight ``qw``'s node on ``isa`` for its input ``x`` (the float values out of
    the activation FakeQuantize ``fq``, :func:`safeobs.openvino.capture.activation_fq`)."""
    codes, zp = E.grid_codes(x, fq[2], fq[3], fq[4])
    w = np.asarray(qw.codes, np.int8)
    if qw.op_type == "MatMul":
        if qw.node.get_attributes().get("transpose_a", False):
            codes = np.swapaxes(codes, -1, -2)
        E.MatMul(codes, zp, w, transpose_b=not qw.transpose, isa=isa)
    else:
        getattr(E, qw.op_type)(codes, zp, w, isa=isa, **_conv_args(qw.node))
    return E.saturation_count()


def emulate_saturation(model, inputs, weights=None) -> dict:
    """``{node name: {isa: saturated int16 lanes}}`` over ``inputs`` (an iterable of feeds: an array, a list
    of arrays or a ``{input name: array}`` dict per inference) for every int8 weight node whose input comes
    from a per-tensor FakeQuantize (others do not run on the int8 kernels and are left out)."""
    weights = [qw for qw in (weights if weights is not None else read_weights(model)) if qw.int8]
    no_pairs = {qw.name for qw in weights if not any(len(kernel_columns(qw, i)) for i in SAT_ISAS)}
    fqs = {qw.name: capture.activation_fq(qw.node) for qw in weights if qw.name not in no_pairs}
    todo = [qw for qw in weights if fqs.get(qw.name) is not None]
    counts = {qw.name: dict.fromkeys(SAT_ISAS, 0) for qw in todo}
    counts.update({name: dict.fromkeys(SAT_ISAS, 0) for name in no_pairs})  # depthwise: no lane can saturate
    for vals in capture.run(model, [qw.name for qw in todo], inputs):
        for qw in todo:
            for isa in SAT_ISAS:
                counts[qw.name][isa] += emulate_node(qw, vals[qw.name], fqs[qw.name], isa)
    return counts


def format_audit(result: dict, only_unsafe: bool = False) -> str:
    lines = [f"{'node':<48} {'op':<16} " + " ".join(f"{i:<36}" for i in ISAS)]
    for n in result["nodes"]:
        if only_unsafe and not any(n["unsafe_channels"].values()):
            continue
        cells = []
        for isa in ISAS:
            k = len(n["unsafe_channels"][isa])
            state = "SAFE" if not k else f"{k}/{n['channels']} ch"
            if n.get("saturated_lanes") is not None:
                state += f" ({n['saturated_lanes'][isa]} sat)"
            cells.append(f"{n['kernel'][isa]}: {state}")
        lines.append(f"{n['name'][-48:]:<48} {n['op']:<16} " + " ".join(f"{c:<36}" for c in cells))
    for n in result.get("unweighted", []):
        cells = [f"{n['kernel'][i]}: {'CAN SATURATE' if n['can_saturate'][i] else 'exact'}" for i in ISAS]
        lines.append(f"{n['name'][-48:]:<48} {n['op']:<16} " + " ".join(f"{c:<36}" for c in cells))
        lines.append(f"    {n['kind']}")
    lines.append(
        "UNSAFE: some channel or activation x activation MatMul can saturate a vpmaddubsw int16 lane"
        if result["unsafe"]
        else "safe: no weight pair can saturate on avx2, avx512 or vnni"
    )
    return "\n".join(lines)


def _const_layers(xml_text: str) -> dict:
    """Const layers of an IR: name -> (offset, size, id)."""
    root = ET.fromstring(xml_text)
    out = {}
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        if data is None or data.get("offset") is None:
            continue
        name = layer.get("name")
        if name in out:
            raise ValueError(f"Const layer name {name!r} is not unique in the IR")
        out[name] = (int(data.get("offset")), int(data.get("size")), layer.get("id"))
    return out


def repair_model(model, layout: str = "openvino") -> tuple[list[dict], dict]:
    """New codes / scales for the unsafe channels of every int8 weight (others keep their rows bit for bit).

    Returns ``(infos, patches)``: ``patches`` maps Const layer names to their new bytes."""
    infos, patches = [], {}
    for qw in read_weights(model):
        bad = np.unique(np.concatenate([unsafe_channels(qw, i) for i in ("avx2", "avx512")])).astype(np.int64)
        info = {
            "name": qw.name,
            "op": qw.op_type,
            "channels": int(qw.view(qw.codes).shape[0]),
            "changed": int(bad.size),
        }
        infos.append(info)
        if bad.size == 0:
            continue
        codes, scale = safe_codes(qw, None, layout)
        old_v, new_v = qw.view(qw.codes).copy(), qw.view(codes)
        old_v[bad] = new_v[bad]
        s_old, per_channel = qw.channel_scales()
        s_new = s_old.copy()
        s_new[bad if per_channel else slice(None)] = scale.reshape(-1)[bad if per_channel else slice(None)]
        if not per_channel:
            old_v = qw.view(codes)
        for isa in ("avx2", "avx512"):
            if unsafe_channels(qw, isa, qw.unview(old_v)).size:
                raise RuntimeError(f"{qw.name}: repair left an unsafe channel on {isa}")
        patches[qw.codes_node.get_friendly_name()] = qw.unview(old_v).astype(np.int8).tobytes()
        patches[qw.scale_node.get_friendly_name()] = np.ascontiguousarray(
            s_new.reshape(qw.scale.shape) if per_channel else s_new[:1].reshape(qw.scale.shape),
            dtype=np.asarray(qw.scale).dtype,
        ).tobytes()
    return infos, patches


def repair_ir(path: str, output: str, layout: str = "openvino") -> list[dict]:
    """Repair the IR at ``path`` into ``output`` (.xml; its .bin next to it)."""
    if not output.lower().endswith(".xml"):
        raise ValueError(f"{output}: the repaired IR must be an .xml path (its .bin goes next to it)")
    model = load_ir(path)
    infos, patches = repair_model(model, layout)
    if not infos:
        raise ValueError(f"{path}: no int8 weight (Constant i8 -> Convert -> Multiply) to audit (is it quantized?)")
    with open(path, "rb") as f:
        xml_bytes = f.read()
    with open(os.path.splitext(path)[0] + ".bin", "rb") as f:
        blob = bytearray(f.read())
    consts = _const_layers(xml_bytes.decode())
    xml_text = xml_bytes.decode()
    for name, new in patches.items():
        if name not in consts:
            raise ValueError(f"{path}: Const {name!r} not found in the XML")
        off, size, lid = consts[name]
        if size != len(new):
            raise RuntimeError(f"{name}: new data is {len(new)} bytes, the IR holds {size}")
        shared = any(o < off + size and off < o + s for n, (o, s, _) in consts.items() if n != name)
        if not shared:
            blob[off : off + size] = new
            continue
        new_off = len(blob)
        blob += new
        pat = re.compile(rf'(<layer id="{re.escape(lid)}"[^>]*>\s*<data [^>]*?offset="){off}(")')
        xml_text, n = pat.subn(lambda m: f"{m.group(1)}{new_off}{m.group(2)}", xml_text, count=1)
        if n != 1:
            raise RuntimeError(f"{name}: could not rewrite its offset in the XML")
    with open(output, "wb") as f:
        f.write(xml_text.encode() if xml_text != xml_bytes.decode() else xml_bytes)
    with open(os.path.splitext(output)[0] + ".bin", "wb") as f:
        f.write(blob)
    return infos


def format_repair(infos: list[dict], only_changed: bool = True) -> str:
    rows = [i for i in infos if i["changed"] or not only_changed]
    lines = [f"{'node':<48} {'op':<16} re-quantized channels"]
    lines += [f"{i['name'][-48:]:<48} {i['op']:<16} {i['changed']}/{i['channels']}" for i in rows]
    lines.append(
        f"{sum(i['changed'] for i in infos)} channels re-quantized in {sum(bool(i['changed']) for i in infos)}"
        f" of {len(infos)} int8 weights"
    )
    return "\n".join(lines)


def load_inputs(path: str, model, scale: float = 1.0) -> list[dict]:
    """Feeds from an ``.npz`` of model inputs (by input name, or ``arr_0``, ``arr_1``, ... in input order); float
    arrays are multiplied by ``scale``.  A batch larger than a static batch of 1 is fed one sample at a time."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any read error is a usage error
        raise ValueError(f"--inputs {path}: not a readable .npz of model inputs ({e})") from None
    names = [i.get_any_name() for i in model.inputs]
    if set(arrays) == {f"arr_{i}" for i in range(len(arrays))}:
        if len(arrays) != len(names):
            raise ValueError(f"--inputs {path}: {len(arrays)} arrays for {len(names)} model inputs")
        arrays = {n: arrays[f"arr_{i}"] for i, n in enumerate(names)}
    if set(arrays) != set(names):
        raise ValueError(f"--inputs {path}: arrays {sorted(arrays)} do not match the model inputs {names}")
    arrays = {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    one = all(
        i.get_partial_shape().rank.is_static
        and len(i.get_partial_shape()) > 0
        and i.get_partial_shape()[0].is_static
        and i.get_partial_shape()[0].get_length() == 1
        for i in model.inputs
    )
    n = {v.shape[0] if v.ndim else 1 for v in arrays.values()}
    if one and len(n) == 1 and n.pop() > 1:
        return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]
    return [arrays]


def cmd_audit(args, dump) -> int:
    if getattr(args, "photos", None):
        raise ValueError("--photos is for torch models; give OpenVINO model inputs with --inputs FILE.npz")
    model = load_ir(args.model)
    inputs = load_inputs(args.inputs, model, args.input_scale) if getattr(args, "inputs", None) else None
    try:
        result = audit_model(model, inputs)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's errors on bad inputs
        raise ValueError(
            f"{args.model}: cannot run the model on --inputs ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not result["nodes"] and not result["unweighted"]:
        raise ValueError(f"{args.model}: no int8 weight (Constant i8 -> Convert -> Multiply) (is it quantized?)")
    result["model"] = args.model
    print(dump(result) if args.json else format_audit(result, only_unsafe=args.unsafe_only))
    return 1 if result["unsafe"] else 0


def cmd_repair(args, dump) -> int:
    layout = args.layout or "openvino"
    if layout not in ("openvino", "onednn", "x86"):
        raise ValueError(f"--layout {layout} is not for OpenVINO IR; use openvino, onednn or x86")
    infos = repair_ir(args.model, args.output, layout)
    src = load_ir(args.model)
    left = activation_matmuls(src) + fq_weights(src)
    if args.json:
        print(
            dump({"model": args.model, "output": args.output, "layout": layout, "weights": infos, "not_repaired": left})
        )
    else:
        print(format_repair(infos, only_changed=not args.all))
        print(f"saved OpenVINO IR to {args.output}")
        if left:
            print(f"NOT REPAIRED: {len(left)} node(s) can still saturate without VNNI (exit 1):")
            for n in left:
                print(f"  {n['name']}: {n['kind']}")
            print(
                "  re-quantize with safeobs.openvino.quantize (activation_matmuls='float', the default) or add "
                "them to NNCF's ignored_scope"
            )
    return 1 if left else 0
