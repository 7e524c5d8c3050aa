"""Subprocess entry point of :func:`safeobs.tools.realrun.run_module`:
``python -m safeobs.tools._realrun_worker in.pkl out.pkl`` loads the model file ``realkernel.run_worker``
wrote next to the job and runs it (optionally also under the emulator)."""

from __future__ import annotations

import sys

import numpy as np

from safeobs.kernels._realkernel_worker import main as _main


def _to_numpy(torch, y):
    if isinstance(y, (tuple, list)):
        return [_to_numpy(torch, t) for t in y]
    if isinstance(y, torch.Tensor):
        return y.int_repr().numpy() if y.is_quantized else y.detach().numpy()
    return y


def run_module(torch, job):
    path = job["path"]
    # realkernel.run_worker wrote this file itself into its private (0700) directory: no outside file
    fmt = job.get("format") or ("torchscript" if _is_torchscript(path) else "pickle")
    model = torch.jit.load(path) if fmt == "torchscript" else torch.load(path, weights_only=False)
    if job.get("forced"):
        from safeobs.kernels import realkernel
        from safeobs.tools.realrun import model_convs

        why = realkernel.forced_mismatch(job["forced"], job["engine"], model_convs(model))
        if why:
            return {"mismatch": why}

    def run():
        out = []
        with torch.no_grad():
            for inp in job["inputs"]:
                args = inp if isinstance(inp, (tuple, list)) else (inp,)
                out.append(_to_numpy(torch, model(*[torch.from_numpy(np.asarray(a)) for a in args])))
        return out

    if job.get("emulate") is None:
        return run()
    # The same model again, its int8 modules through the emulator, in this process: every other
    # (float) op runs the same code on the same CPU, so any difference is the int8 kernels'.
    from safeobs.kernels import emulator  # importing safeobs registered the runtimes' emulator hooks

    real = run()
    with emulator.emulate(model, engine=job["engine"], **job["emulate"]):
        return real, run()


def _is_torchscript(path) -> bool:
    from safeobs.tools.serialization import is_torchscript

    return is_torchscript(path)


def main(src: str, dst: str) -> None:
    _main(src, dst, run_module=run_module)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
