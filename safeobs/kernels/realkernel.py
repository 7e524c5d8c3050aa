"""Run torch's real quantized kernels in a subprocess, under a chosen CPU model (kernel-spec §2.1, §10).

FBGEMM and oneDNN read their ISA at process start, so every call starts ONE fresh interpreter
(``sys.executable``) that runs a whole batch.  Data goes through a temporary pickle file.

Modes (:data:`MODES`): ``"native"`` (host as is), ``"avx2"`` / ``"avx512"`` (ISA forced down by
``FBGEMM_ENABLE_INSTRUCTIONS`` + ``ONEDNN_MAX_CPU_ISA``) and ``"haswell"`` (``qemu-x86_64 -cpu Haswell``:
an AVX2-only CPU as every library sees it).

A forced ISA is *not* a CPU of that ISA for everything (kernel-spec §2, §3): FBGEMM's groupwise conv
picks its kernel (and G_together) from cpuinfo, and engine ``x86`` routes convs to oneDNN by cpuinfo's
VNNI flag.  :func:`forced_mismatch` says when a forced run would not be the real kernels of that ISA;
:func:`run_ops` and :func:`safeobs.tools.realrun.run_module` refuse such runs, and :func:`mode_for` picks the mode that
does reach them (native, forced, else qemu Haswell).  :func:`describe` names the kernel that ran.

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
ISAS = ("avx2", "avx512", "avx512_vbmi", "vnni")  # as safeobs.dispatch.ISAS, in order


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The host CPU's model name (for benchmark reports), e.g. "AMD EPYC"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def host_isa(flags: set[str] | None = None) -> str:
    """The host CPU as :mod:`safeobs.kernels.dispatch` names it: "vnni", "avx512_vbmi", "avx512" or "avx2"."""
    flags = _cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        if flags & {"avx512_vnni", "avx512vnni"}:
            return "vnni"
        return "avx512_vbmi" if "avx512vbmi" in flags else "avx512"
    return "avx2"


def forced_avx512_isa(flags: set[str] | None = None) -> str:
    """What ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` gives on this host: oneDNN's relo conv layouts read AVX512_VBMI
    from CPUID, which the variable does not mask, so a VBMI host (Ice Lake, Zen 4, ...) forced down is an
    "avx512_vbmi" CPU, never a Skylake-SP ("avx512")."""
    flags = _cpu_flags() if flags is None else flags
    return "avx512_vbmi" if "avx512vbmi" in flags else "avx512"


_FORCED = {
    "FBGEMM_ENABLE_INSTRUCTIONS": {"AVX2": "avx2", "AVX512": "avx512"},
    "ONEDNN_MAX_CPU_ISA": {"AVX2": "avx2", "AVX512_CORE": "avx512"},
}


def _forced_isa(name: str, host: str) -> str:
    """The ISA a forced ``name`` ("avx2" | "avx512") reaches on ``host`` (it can only lower it)."""
    isa = forced_avx512_isa() if name == "avx512" else name
    if host == "avx512" and isa == "avx512_vbmi":  # unreachable: a host without VBMI
        isa = "avx512"
    return isa if ISAS.index(isa) < ISAS.index(host) else host


def process_isa(engine: str = "fbgemm", environ=None) -> str:
    """The ISA this process's ``engine`` GEMM/conv kernels run: the host's, lowered by the ISA variable
    that library read at start (FBGEMM_ENABLE_INSTRUCTIONS for fbgemm, ONEDNN_MAX_CPU_ISA for onednn;
    engine x86 needs both to agree).  A variable can only lower the ISA (kernel-spec §2.1)."""
    env = os.environ if environ is None else environ
    host = host_isa()
    names = {
        "fbgemm": ["FBGEMM_ENABLE_INSTRUCTIONS"],
        "onednn": ["ONEDNN_MAX_CPU_ISA"],
        "x86": ["FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"],
    }[engine]
    isas = set()
    for name in names:
        forced = _FORCED[name].get(env.get(name, "").strip().upper())
        isas.add(_forced_isa(forced, host) if forced else host)
    if len(isas) > 1:
        raise ValueError(f"engine {engine}: FBGEMM_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA force different ISAs")
    return isas.pop()


def mode_isa(mode: str) -> str:
    """The ISA the kernels see in ``mode`` (groupwise excepted, it always follows the host); forced
    ``"avx512"`` is ``"avx512_vbmi"`` on a VBMI host (:func:`forced_avx512_isa`)."""
    _check_mode(mode)
    if mode in ("avx2", "avx512"):
        return _forced_isa(mode, host_isa())
    return {"native": host_isa(), "haswell": "avx2"}[mode]


def available(mode: str) -> bool:
    """Whether ``mode`` can run here: qemu on PATH for haswell; forced ISAs need a host that has them
    (and must actually lower it; on an AVX2 host ``"avx2"`` equals native but is still available)."""
    _check_mode(mode)
    if mode == "haswell":
        return shutil.which(QEMU) is not None
    if mode == "native":
        return True
    return "avx2" in _cpu_flags() and ISAS.index(host_isa()) >= ISAS.index(mode)


def _conv_facts(op: str, w_shape, groups=1, stride=1, padding=0, dilation=1, output_padding=0, symmetric=True) -> dict:
    return dict(
        transposed=op.startswith("conv_transpose"),
        w_shape=tuple(int(s) for s in w_shape),
        groups=int(groups),
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        symmetric=bool(symmetric),
    )


def case_convs(cases) -> list[dict]:
    """The conv facts :func:`forced_mismatch` needs, from :func:`run_ops` case dicts."""
    import numpy as np

    return [
        _conv_facts(
            c["op"],
            np.shape(c["w"]),
            c.get("groups", 1),
            c.get("stride", 1),
            c.get("padding", 0),
            c.get("dilation", 1),
            c.get("output_padding", 0),
            np.all(np.asarray(c.get("w_zp", 0)) == 0),
        )
        for c in cases
        if str(c.get("op", "")).startswith("conv")
    ]


def forced_mismatch(mode: str, engine: str, convs=(), host: str | None = None) -> str | None:
    """Why a forced-ISA run in ``mode`` of these convs would NOT be the kernels of a real ``mode`` CPU.

    None when it would be (or ``mode`` forces nothing on this host).  kernel-spec §2: FBGEMM groupwise
    takes its kernel and G_together from cpuinfo; §3: engine x86 sends convs to oneDNN iff cpuinfo has VNNI.
    """
    from . import dispatch

    host = host or host_isa()
    if mode not in ("avx2", "avx512"):
        return None
    mode = _forced_isa(mode, host)
    if mode == host:
        return None
    for c in convs:
        symmetric_route = dispatch.should_use_onednn_quant(
            weight_symmetric=c["symmetric"], groups=c["groups"], output_padding=c["output_padding"], isa=host
        )
        if engine == "x86" and symmetric_route != dispatch.should_use_onednn_quant(
            weight_symmetric=c["symmetric"], groups=c["groups"], output_padding=c["output_padding"], isa=mode
        ):
            return (
                f"engine x86 routes conv {c['w_shape']} (groups {c['groups']}) to oneDNN by this {host} host's "
                f"cpuinfo, where a real {mode} CPU runs FBGEMM (kernel-spec §3)"
            )
        if engine == "onednn" or (engine == "x86" and symmetric_route):
            continue
        paths = {
            dispatch.fbgemm_conv_path(
                c["w_shape"],
                groups=c["groups"],
                stride=c["stride"],
                padding=c["padding"],
                dilation=c["dilation"],
                transposed=c["transposed"],
                isa=i,
            )
            for i in (host, mode)
        }
        if "groupwise" in paths:
            return (
                f"FBGEMM groupwise conv {c['w_shape']} (groups {c['groups']}) ignores FBGEMM_ENABLE_INSTRUCTIONS: "
                f"it picks its kernel and G_together from this {host} host's cpuinfo (kernel-spec §2, §4)"
            )
    return None


def mode_for(isa: str, engine: str = "fbgemm", convs=()) -> str | None:
    """The fastest mode that runs the real kernels of an ``isa`` CPU for these convs, or None.

    Native when the host is that ISA; else the forced ISA when it reaches that CPU kind (a forced AVX512_CORE
    run is ``"avx512_vbmi"`` on a VBMI host and ``"avx512"`` only without VBMI) and :func:`forced_mismatch`
    allows it; else qemu Haswell for ``"avx2"``.  AVX-512 and VNNI cannot be emulated by qemu.
    """
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    host = host_isa()
    if isa == host:
        return "native"
    if ISAS.index(isa) > ISAS.index(host):
        return None
    forced = "avx512" if isa in ("avx512", "avx512_vbmi") else isa
    if (
        forced in ("avx2", "avx512")
        and _forced_isa(forced, host) == isa
        and forced_mismatch(forced, engine, convs, host) is None
    ):
        return forced
    if isa == "avx2" and available("haswell"):
        return "haswell"
    return None


def describe(mode: str, engine: str = "fbgemm") -> str:
    """The kernel a mode really runs, for labels: e.g. "fbgemm on avx2 (qemu-x86_64 -cpu Haswell)"."""
    _check_mode(mode)
    host = host_isa()
    isa = mode_isa(mode)
    how = {
        "native": f"native {host} host",
        "haswell": "qemu-x86_64 -cpu Haswell",
        "avx2": f"{host} host forced to AVX2" if isa != host else f"native {host} host",
        "avx512": f"{host} host forced to AVX512_CORE" if isa != host else f"native {host} host",
    }[mode]
    return f"{engine} on {isa} ({how})"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")


def _command(mode: str, args: list[str], worker: str = "safeobs.kernels._realkernel_worker") -> tuple[list[str], dict]:
    env = dict(os.environ)
    for key in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
    env.update(MODES[mode])
    # a module runs with ``-m`` (imports safeobs, hence torch); a script path runs bare (ORT's worker: no torch)
    cmd = [sys.executable, worker, *args] if worker.endswith(".py") else [sys.executable, "-m", worker, *args]
    if mode == "haswell":
        cmd = [QEMU, "-cpu", "Haswell", *cmd]
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the safeobs package
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return cmd, env


def run_worker(
    worker: str, job, mode: str, timeout: float, label: str = "real-kernel", env: dict | None = None, write=None
):
    """Pickle ``job`` to ``python -m worker IN OUT`` (or ``python worker.py IN OUT``) in ONE fresh subprocess
    under ``mode``, with ``env`` added to its environment; its result.

    Every file the subprocess reads is written here, into a private ``tempfile.mkdtemp`` directory (mode
    0700): the job, and whatever ``write(directory)`` writes there (e.g. a model file,
    :func:`safeobs.tools.realrun.run_module`); the dict it returns is merged into the job.  The one way every
    runtime's real kernels are run (torch ops here, torch models in :mod:`safeobs.tools.realrun`, torchao's in
    :mod:`safeobs.torchao._worker`, ONNX Runtime's in ``safeobs/onnx/_ort_worker.py``)."""
    _check_mode(mode)
    if not available(mode):
        raise RuntimeError(f"mode {mode!r} is not available on this host")
    tmp = tempfile.mkdtemp(prefix="safeobs-rk-")  # 0700: no other user can read or swap what the worker loads
    try:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        if write is not None:
            job = dict(job, **write(tmp))
        with open(src, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        cmd, full_env = _command(mode, [src, dst], worker)
        full_env.update(env or {})
        try:
            proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{label} subprocess ({mode}) timed out after {timeout}s") from e
        if proc.returncode != 0 or not os.path.exists(dst):
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"{label} subprocess ({mode}) failed with code {proc.returncode}:\n{tail}")
        with open(dst, "rb") as f:
            return pickle.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(job: dict, mode: str, timeout: float, write=None, worker: str = "safeobs.kernels._realkernel_worker"):
    out = run_worker(worker, job, mode, timeout, write=write)
    if isinstance(out, dict) and "mismatch" in out:
        raise ValueError(
            f"mode {mode!r} cannot run this model as a real {mode} CPU would: {out['mismatch']}; "
            f"use realkernel.mode_for({mode!r}, ...) (qemu Haswell for avx2)"
        )
    return out


def run_ops(cases, *, mode: str = "native", engine: str = "fbgemm", timeout: float = 1200.0) -> list:
    """Run every case (see module doc) through ``torch.ops.quantized`` with ``engine`` in ONE subprocess."""
    if engine not in ("fbgemm", "onednn", "x86"):
        raise ValueError(f"engine must be fbgemm, onednn or x86, got {engine!r}")
    cases = [dict(c) for c in cases]
    for c in cases:
        if "op" not in c or "x" not in c:
            raise ValueError("every case needs at least 'op' and 'x'")
    why = forced_mismatch(mode, engine, case_convs(cases)) if mode in MODES else None
    if why:
        raise ValueError(
            f"mode {mode!r} would not run these cases as a real {mode} CPU does: {why}; "
            f"use realkernel.mode_for({mode!r}, engine, case_convs(cases)) (qemu Haswell for avx2)"
        )
    return _run({"kind": "ops", "engine": engine, "cases": cases}, mode, timeout)
