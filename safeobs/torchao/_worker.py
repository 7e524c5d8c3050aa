"""Real torchao / ``torch._int_mm`` / ``onednn.qlinear_pointwise`` kernels in one subprocess per CPU mode.

:func:`run` starts ONE interpreter in a :mod:`safeobs.kernels.realkernel` mode (``native``, ``avx2`` /
``avx512`` with ``ONEDNN_MAX_CPU_ISA`` forced, ``haswell`` under qemu) and runs a batch of cases;
``python -m safeobs._torchao_worker in.pkl out.pkl`` is the subprocess side.  Cases (numpy in, numpy out):

* ``{"kind": "int_mm", "a": int8|uint8 (M, K), "b": int8 (K, N)}`` -> int32 (M, N)
* ``{"kind": "qlinear", "x": int8|uint8 (M, K), "x_scale", "w": int8 (N, K), "w_scale": (N,), "bias"}``
  -> float32: ``onednn.qlinear_pointwise`` as Inductor calls it for torchao
* ``{"kind": "linear", "x": float32 (..., K), "w": float32 (N, K), "bias", "safe": bool,
  "granularity": "row" | "tensor", "asym": bool}`` -> ``(y, qdata, scale)`` of a ``quantize_``'d Linear, eager

Every case may set ``"threads"`` (default 1).  The first result is ``info``: what this process's torch sees.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings

import numpy as np


def run(cases, *, mode: str = "native", timeout: float = 900.0):
    """Run ``cases`` in one subprocess; returns ``(info, [result per case])``."""
    from ..kernels import realkernel

    if mode not in realkernel.MODES:
        raise ValueError(f"mode must be one of {tuple(realkernel.MODES)}, got {mode!r}")
    return realkernel.run_worker("safeobs.torchao._worker", list(cases), mode, timeout, label="torchao kernel")


def _info(torch):
    return {
        "cpu_vnni": bool(torch.cpu._is_vnni_supported()),
        "cpu_amx": bool(torch.cpu._is_amx_tile_supported()),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def _linear(torch, c):
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Stock
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    from safeobs import torchao as sto

    w = torch.from_numpy(np.asarray(c["w"], np.float32))
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=c.get("bias") is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if c.get("bias") is not None:
            lin.bias.copy_(torch.from_numpy(np.asarray(c["bias"], np.float32)))
    kw = dict(
        granularity=PerRow() if c.get("granularity", "row") == "row" else PerTensor(),
        act_mapping_type=MappingType.ASYMMETRIC if c.get("asym") else MappingType.SYMMETRIC,
        set_inductor_config=False,
    )
    cfg = sto.Int8DynamicActivationInt8WeightConfig(**kw) if c.get("safe") else Stock(**kw)
    model = torch.nn.Sequential(copy.deepcopy(lin)).eval()
    quantize_(model, cfg)
    with torch.no_grad():
        y = model(torch.from_numpy(np.asarray(c["x"], np.float32)))
    qw = model[0].weight
    return y.numpy(), qw.qdata.numpy(), qw.scale.float().numpy().reshape(-1)


def run_case(torch, c):
    kind = c["kind"]
    if kind == "int_mm":
        return torch._int_mm(
            torch.from_numpy(np.ascontiguousarray(c["a"])), torch.from_numpy(np.ascontiguousarray(c["b"]))
        ).numpy()
    if kind == "qlinear":
        x = torch.from_numpy(np.ascontiguousarray(c["x"]))
        packed = torch.ops.onednn.qlinear_prepack(
            torch.from_numpy(np.ascontiguousarray(c["w"], np.int8)), list(x.shape)
        )
        bias = None if c.get("bias") is None else torch.from_numpy(np.asarray(c["bias"], np.float32))
        y = torch.ops.onednn.qlinear_pointwise(
            x,
            float(c.get("x_scale", 1.0)),
            0,
            packed,
            torch.from_numpy(np.asarray(c["w_scale"], np.float32)),
            None,
            bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return y.numpy()
    if kind == "linear":
        return _linear(torch, c)
    raise ValueError(f"unknown case kind {kind!r}")


def main(src: str, dst: str) -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # torchao's optional-kernel notices
    import torch

    with open(src, "rb") as f:
        cases = pickle.load(f)
    out = []
    for i, c in enumerate(cases):
        torch.set_num_threads(int(c.get("threads", 1)))
        try:
            out.append(run_case(torch, c))
        except Exception as e:
            raise RuntimeError(f"case {i} ({c['kind']}): {e}") from e
    with open(dst, "wb") as f:
        pickle.dump((_info(torch), out), f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
