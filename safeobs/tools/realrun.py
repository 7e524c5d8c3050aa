"""Run a whole torch model on the real kernels in a fresh subprocess (:func:`run_module`).

The model-level half of :mod:`safeobs.kernels.realkernel` (which runs plain op cases and knows no
model): loads model files, saves an in-memory model into the worker's private directory, and reads the
conv facts of a model's layers (:func:`model_convs`) for :func:`safeobs.kernels.realkernel.forced_mismatch`.
"""

from __future__ import annotations

import os

from ..kernels import realkernel
from .runtimes import layers
from .serialization import load_model

__all__ = ["model_convs", "run_module"]


def model_convs(model) -> list[dict]:
    """The conv facts of a converted model's quantized convs (eager or TorchScript)."""
    return [
        realkernel._conv_facts(
            q.kind, tuple(q.weight.shape), q.groups, q.stride, q.padding, q.dilation, q.output_padding or 0, q.symmetric
        )
        for q in layers(model)
        if q.op != "linear"
    ]


def _write_model(model, path: str) -> dict:
    """Save an in-memory model for the worker (TorchScript as TorchScript, else a pickle only safeobs reads)."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, path)
        return {"path": path, "format": "torchscript"}
    if any(lay.kind == "linear_torchao" for lay in layers(model)):
        from ..torchao import make_picklable

        make_picklable(model)
    try:
        torch.save(model, path)
    except Exception as e:  # e.g. FX GraphModules holding unpicklable attributes
        raise ValueError(
            f"cannot hand this model to the worker ({type(e).__name__}); trace it to TorchScript first"
        ) from None
    return {"path": path, "format": "pickle"}


def run_module(
    path,
    inputs,
    *,
    mode: str = "native",
    engine: str = "x86",
    emulate: dict | None = None,
    timeout: float = 1200.0,
    trust_pickle: bool = False,
    arch=None,
) -> list:
    """Run a model on each of ``inputs`` (numpy arrays or tuples of them; float inputs) in ONE subprocess.
    Returns one numpy array per input (int codes when the output is quantized).

    ``path``: a ``torch.nn.Module`` (eager or TorchScript), or a model file, loaded HERE by
    :func:`safeobs.load_model`: a state dict with ``arch``, or a TorchScript / pickled model
    file only with ``trust_pickle=True`` (loading and running those runs their code).  The worker gets
    the model as a file this function writes into a private directory; it never opens ``path``.

    With ``emulate=dict(isa=..., exact=...)`` (an eager model) the subprocess also runs the
    model under :func:`safeobs.emulator.emulate` and returns ``(real, emulated)``: float ops then run
    the same code on the same (emulated) CPU in both, so a difference can only come from the int8
    kernels.

    A forced mode (``"avx2"``/``"avx512"``) first checks the model's convs with :func:`forced_mismatch`
    in the subprocess and raises ValueError instead of reporting another kernel's result.
    """
    import torch

    if isinstance(path, torch.nn.Module):
        model = path
    elif isinstance(path, (str, os.PathLike)):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such model file")
        model, source = load_model(os.fspath(path), trust_pickle=trust_pickle, arch=arch)
        if source == "state":
            raise ValueError(f"{path}: a safeobs state file holds the layers, not the forward pass: pass arch=")
    else:
        raise TypeError(f"path must be a model file or a torch.nn.Module, got {type(path).__name__}")
    job = {
        "kind": "module",
        "engine": engine,
        "inputs": list(inputs),
        "emulate": emulate,
        "forced": mode if mode in ("avx2", "avx512") else None,
    }
    return realkernel._run(
        job,
        mode,
        timeout,
        write=lambda d: _write_model(model, os.path.join(d, "model.pt")),
        worker="safeobs.tools._realrun_worker",
    )
