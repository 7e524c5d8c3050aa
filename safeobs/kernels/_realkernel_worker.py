"""Subprocess entry point of :mod:`safeobs.kernels.realkernel`:
``python -m safeobs.kernels._realkernel_worker in.pkl out.pkl`` runs ``torch.ops.quantized`` cases.

:func:`main` also serves :mod:`safeobs.tools._realrun_worker`, which passes its ``run_module`` for model jobs."""

from __future__ import annotations

import os
import pickle
import sys
import warnings

import numpy as np


def _qx(torch, c):
    return torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(np.ascontiguousarray(c["x"], np.uint8)), float(c["x_scale"]), int(c["x_zp"])
    )


def _qw(torch, c):
    w = torch.from_numpy(np.ascontiguousarray(c["w"], np.int8))
    scale, zp = np.asarray(c["w_scale"], np.float64), np.asarray(c.get("w_zp", 0), np.int64)
    if scale.size == 1 and zp.size == 1:
        return torch._make_per_tensor_quantized_tensor(w, float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))
    oc = w.shape[0]
    return torch._make_per_channel_quantized_tensor(
        w,
        torch.from_numpy(np.broadcast_to(scale.reshape(-1), (oc,)).copy()),
        torch.from_numpy(np.broadcast_to(zp.reshape(-1), (oc,)).copy()),
        0,
    )


def _tuple(v, n):
    return [int(v)] * n if np.isscalar(v) else [int(x) for x in v]


def run_case(torch, c):
    op, q = c["op"], torch.ops.quantized
    bias = None if c.get("bias") is None else torch.from_numpy(np.asarray(c["bias"], np.float32))
    w = _qw(torch, c)
    relu = "_relu" if c.get("relu") else ""
    if op == "linear_dynamic":
        packed = q.linear_prepack(w, bias)
        fn = q.linear_relu_dynamic if c.get("relu") else q.linear_dynamic
        y = fn(torch.from_numpy(np.asarray(c["x"], np.float32)), packed, bool(c.get("reduce_range", False)))
        return y.numpy()
    x = _qx(torch, c)
    if op == "linear":
        packed = q.linear_prepack(w, bias)
        y = getattr(q, "linear" + relu)(x, packed, float(c["y_scale"]), int(c["y_zp"]))
    elif op in ("conv1d", "conv2d", "conv3d"):
        nd = int(op[4])
        hp = [_tuple(c.get(k, d), nd) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))]
        packed = getattr(q, op + "_prepack")(w, bias, *hp, int(c.get("groups", 1)))
        y = getattr(q, op + relu)(x, packed, float(c["y_scale"]), int(c["y_zp"]))
    elif op == "conv_transpose2d":
        hp = [
            _tuple(c.get(k, d), 2) for k, d in (("stride", 1), ("padding", 0), ("output_padding", 0), ("dilation", 1))
        ]
        if c.get("relu"):
            raise ValueError("torch has no fused quantized conv_transpose2d_relu")
        packed = q.conv_transpose2d_prepack(w, bias, *hp, int(c.get("groups", 1)))
        y = q.conv_transpose2d(x, packed, float(c["y_scale"]), int(c["y_zp"]))
    else:
        raise ValueError(f"unknown op {op!r}")
    return y.int_repr().numpy()


def main(src: str, dst: str, run_module=None) -> None:
    warnings.filterwarnings("ignore", message=".*deprecat.*")  # pytorch/pytorch#184982
    import torch

    torch.set_num_threads(1)
    with open(src, "rb") as f:
        job = pickle.load(f)
    torch.backends.quantized.engine = job["engine"]
    if job["kind"] == "module" and os.path.dirname(os.path.abspath(job["path"])) != os.path.dirname(
        os.path.abspath(src)
    ):
        raise RuntimeError("refusing to load a model file that realkernel.run_worker did not write next to the job")
    if job["kind"] == "ops":
        out = []
        for i, c in enumerate(job["cases"]):
            try:
                out.append(run_case(torch, c))
            except Exception as e:  # report which case the kernel refused
                raise RuntimeError(f"case {i} ({c['op']}, w {np.shape(c['w'])}): {e}") from e
    elif run_module is not None:
        out = run_module(torch, job)
    else:
        raise ValueError(f"unknown job kind {job['kind']!r} for this worker")
    with open(dst, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
