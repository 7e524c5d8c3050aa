"""Audit and repair of OpenVINO IR (``safeobs audit|repair model.xml``).

An IR is XML + a weights blob: loading it runs no code, so no trust flag is needed.  :func:`audit_model` lists
per int8 weight node the kernel the CPU plugin runs on avx2 / avx512 / vnni and the output channels whose
code pairs can saturate there (pairs measured by pair discovery, :mod:`.kernel`).  :func:`repair_ir`
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

from ._deps import require_openvino
from .weights import ISAS, isa_kernel, read_weights, safe_codes, unsafe_channels

DEFAULT_LAYOUT = "openvino"  # safeobs repair MODEL.xml: the OpenVINO CPU plugin pairing


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


def audit_model(model) -> dict:
    """Per int8 weight node: kernels and unsafe output channels on avx2 / avx512 / vnni."""
    nodes = []
    for qw in read_weights(model):
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
    return {"nodes": nodes, "unsafe": any(any(n["unsafe_channels"].values()) for n in nodes)}


def format_audit(result: dict, only_unsafe: bool = False) -> str:
    lines = [f"{'node':<48} {'op':<16} " + " ".join(f"{i:<36}" for i in ISAS)]
    for n in result["nodes"]:
        if only_unsafe and not any(n["unsafe_channels"].values()):
            continue
        cells = []
        for isa in ISAS:
            k = len(n["unsafe_channels"][isa])
            state = "SAFE" if not k else f"{k}/{n['channels']} ch"
            cells.append(f"{n['kernel'][isa]}: {state}")
        lines.append(f"{n['name'][-48:]:<48} {n['op']:<16} " + " ".join(f"{c:<36}" for c in cells))
    lines.append(
        "UNSAFE: some channel can saturate a vpmaddubsw int16 lane"
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


def cmd_audit(args, dump) -> int:
    if getattr(args, "inputs", None) or getattr(args, "photos", None):
        raise ValueError("--inputs/--photos are not supported for OpenVINO IR yet (the audit is exact on the weights)")
    result = audit_model(load_ir(args.model))
    if not result["nodes"]:
        raise ValueError(f"{args.model}: no int8 weight (Constant i8 -> Convert -> Multiply) (is it quantized?)")
    result["model"] = args.model
    print(dump(result) if args.json else format_audit(result, only_unsafe=args.unsafe_only))
    return 1 if result["unsafe"] else 0


def cmd_repair(args, dump) -> int:
    layout = args.layout or "openvino"
    if layout not in ("openvino", "onednn", "x86"):
        raise ValueError(f"--layout {layout} is not for OpenVINO IR; use openvino, onednn or x86")
    infos = repair_ir(args.model, args.output, layout)
    if args.json:
        print(dump({"model": args.model, "output": args.output, "layout": layout, "weights": infos}))
    else:
        print(format_repair(infos, only_changed=not args.all))
        print(f"saved OpenVINO IR to {args.output}")
    return 0
