"""One-node ONNX graphs of ORT's integer ops, run on the real MLAS kernels in a subprocess.

The ground truth for :mod:`safeobs.onnx.emulator` and for the ``ort`` pairing in
:mod:`safeobs.kernels.layout`.  Weights are initializers (as in a quantized model, so ORT prepacks them),
activations are graph inputs.  :func:`run` executes a batch of graphs in ONE subprocess: natively
(``mode="native"``) or as an AVX2-only CPU under ``qemu-x86_64 -cpu Haswell`` (``mode="haswell"``),
where MLAS's cpuid dispatch (onnxruntime/core/mlas/lib/platform.cpp) picks its AVX2 kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..kernels.realkernel import QEMU, host_isa, run_worker

MODES = ("native", "haswell")
MS = "com.microsoft"


def _onnx():
    from . import require

    return require()[0]


def mode_isa(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return host_isa() if mode == "native" else "avx2"


def available(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return mode == "native" or shutil.which(QEMU) is not None


def _tensor_type(arr: np.ndarray):
    onnx = _onnx()
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype)


def single_node(
    op: str,
    inputs: list,
    attrs: dict | None = None,
    out_dtype=np.float32,
    out_rank: int | None = None,
    domain: str = "",
) -> tuple[bytes, list[str]]:
    """A model with one node ``op``; ``inputs`` is a list of ``(name, array, is_initializer)`` (or None
    for an omitted optional input).  Returns the serialized model and the names of its graph inputs."""
    onnx = _onnx()
    h = onnx.helper
    names, graph_inputs, inits, feeds = [], [], [], []
    for item in inputs:
        if item is None:
            names.append("")
            continue
        name, arr, init = item
        arr = np.asarray(arr)
        names.append(name)
        if init:
            inits.append(onnx.numpy_helper.from_array(arr, name))
        else:
            graph_inputs.append(h.make_tensor_value_info(name, _tensor_type(arr), list(arr.shape)))
            feeds.append(name)
    while names and names[-1] == "":
        names.pop()
    node = h.make_node(op, names, ["y"], domain=domain, **(attrs or {}))
    out = h.make_tensor_value_info("y", h.np_dtype_to_tensor_dtype(np.dtype(out_dtype)), None)
    graph = h.make_graph([node], op.lower(), graph_inputs, [out], initializer=inits)
    opsets = [h.make_opsetid("", 21)] + ([h.make_opsetid(MS, 1)] if domain == MS else [])
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString(), feeds


def run(runs: list[dict], *, mode: str = "native", timeout: float = 1200.0) -> list:
    """Run ``[{"model": bytes, "feeds": {name: array} or [feeds, ...], "config": {...}}, ...]`` in ONE
    subprocess.  Returns one list of outputs per run (a list of such lists for a list of feeds)."""
    if not available(mode):
        raise RuntimeError(f"ORT mode {mode!r} is not available on this host (onnxruntime or qemu missing)")
    out = run_worker(
        str(Path(__file__).with_name("_ort_worker.py")),
        {"runs": runs},
        mode,
        timeout,
        label="ORT",
        env={"OMP_NUM_THREADS": "1"},
    )
    for r in out:
        if isinstance(r, str):
            raise RuntimeError(f"ORT run failed: {r}")
    return out
