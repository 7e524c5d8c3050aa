"""Run torch's real quantized kernels in a subprocess, under a chosen CPU model (kernel-spec §2.1, §10).

FBGEMM and oneDNN read their ISA at process start, so every call starts ONE fresh interpreter
(``sys.executable``) that runs a whole batch.  Data goes through a temporary pickle file.

Modes (:data:`MODES`): ``"native"`` (host as is), ``"avx2"`` / ``"avx512"`` (ISA forced down by
``FBGEMM_ENABLE_INSTRUCTIONS`` + ``ONEDNN_MAX_CPU_ISA``; FBGEMM groupwise ignores it) and
``"haswell"`` (``qemu-x86_64 -cpu Haswell``: an AVX2-only CPU as every library sees it).

A *case* is a dict of plain numpy codes and parameters::

    {"op": "linear" | "conv1d" | "conv2d" | "conv3d" | "conv_transpose2d" | "linear_dynamic",
     "x": uint8 codes (float32 for linear_dynamic), "x_scale": float, "x_zp": int,
     "w": int8 codes, "w_scale": float or (OC,) array, "w_zp": int or (OC,) array,
     "bias": float32 (OC,) or None, "y_scale": float, "y_zp": int, "relu": bool,
     "stride", "padding", "dilation", "groups", "output_padding", "reduce_range"}   # as applicable

:func:`run_ops` returns one numpy array per case: uint8 codes, or float32 for ``linear_dynamic``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "native": {},
    "avx2": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "haswell": {},
}
QEMU = "qemu-x86_64"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_isa() -> str:
    """The host CPU as :mod:`safeobs.dispatch` names it: "vnni", "avx512" or "avx2"."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "vnni" if flags & {"avx512_vnni", "avx512vnni"} else "avx512"
    return "avx2"


def mode_isa(mode: str) -> str:
    """The ISA the kernels see in ``mode`` (groupwise excepted, it always follows the host)."""
    _check_mode(mode)
    return {"native": host_isa(), "haswell": "avx2"}.get(mode, mode)


def available(mode: str) -> bool:
    """Whether ``mode`` can run here: qemu on PATH for haswell; forced ISAs need a host that has them
    (and must actually lower it; on an AVX2 host ``"avx2"`` equals native but is still available)."""
    _check_mode(mode)
    if mode == "haswell":
        return shutil.which(QEMU) is not None
    if mode == "native":
        return True
    order = ["avx2", "avx512", "vnni"]
    return "avx2" in _cpu_flags() and order.index(host_isa()) >= order.index(mode)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")


def _command(mode: str, args: list[str]) -> tuple[list[str], dict]:
    env = dict(os.environ)
    for key in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
    env.update(MODES[mode])
    cmd = [sys.executable, "-m", "safeobs._realkernel_worker", *args]
    if mode == "haswell":
        cmd = [QEMU, "-cpu", "Haswell", *cmd]
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return cmd, env


def _run(job: dict, mode: str, timeout: float):
    _check_mode(mode)
    if not available(mode):
        raise RuntimeError(f"mode {mode!r} is not available on this host")
    with tempfile.TemporaryDirectory(prefix="safeobs-rk-") as tmp:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(src, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        cmd, env = _command(mode, [src, dst])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"real-kernel subprocess ({mode}) timed out after {timeout}s") from e
        if proc.returncode != 0 or not os.path.exists(dst):
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"real-kernel subprocess ({mode}) failed with code {proc.returncode}:\n{tail}")
        with open(dst, "rb") as f:
            return pickle.load(f)


def run_ops(cases, *, mode: str = "native", engine: str = "fbgemm", timeout: float = 1200.0) -> list:
    """Run every case (see module doc) through ``torch.ops.quantized`` with ``engine`` in ONE subprocess."""
    if engine not in ("fbgemm", "onednn", "x86"):
        raise ValueError(f"engine must be fbgemm, onednn or x86, got {engine!r}")
    cases = [dict(c) for c in cases]
    for c in cases:
        if "op" not in c or "x" not in c:
            raise ValueError("every case needs at least 'op' and 'x'")
    return _run({"kind": "ops", "engine": engine, "cases": cases}, mode, timeout)


def run_module(path, inputs, *, mode: str = "native", engine: str = "x86", emulate: dict | None = None,
               timeout: float = 1200.0) -> list:
    """Run a saved TorchScript model (``torch.jit.save``) or a pickled callable (``torch.save``) on each of
    ``inputs`` (numpy arrays or tuples of them; float inputs) in ONE subprocess.  Returns one numpy
    array per input (int codes when the output is quantized).

    With ``emulate=dict(isa=..., exact=...)`` (an eager, pickled model) the subprocess also runs the
    model under :func:`safeobs.emulator.emulate` and returns ``(real, emulated)``: float ops then run
    the same code on the same (emulated) CPU in both, so a difference can only come from the int8
    kernels.
    """
    job = {"kind": "module", "engine": engine, "path": str(path), "inputs": list(inputs), "emulate": emulate}
    return _run(job, mode, timeout)
