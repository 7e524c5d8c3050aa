"""Acceptance: the emulator equals torch 2.13's real kernels bit for bit (exact equality of codes).

Cases are drawn with hypothesis (derandomized) in this process and run in ONE subprocess per
(mode, engine) through :mod:`safeobs.realkernel`.  Modes: the host as is ("native"), forced ISAs
("avx2"/"avx512", skipped when the host lacks them) and qemu Haswell (marked ``qemu``).
The torch 2.13 bugs of kernel-spec §9 are left out (see ``_kernel_cases.known_bug``).
"""

from __future__ import annotations

import numpy as np
import pytest
from _kernel_cases import FAMILIES, draw_cases, kernel_of, known_bug
from conftest import mode_param

from safeobs import emulator
from safeobs.kernels import realkernel


def check_bit_exact(mode: str, engine: str, per_family: int) -> None:
    host = realkernel.host_isa()
    isa = realkernel.mode_isa(mode)
    cases = draw_cases(FAMILIES, per_family, engine=engine, isa=isa, seed_name=f"{mode}-{engine}")
    cases = [c for c in cases if known_bug(c, engine, isa, "avx2" if mode == "haswell" else host) is None]
    if mode in ("avx2", "avx512"):  # groupwise / x86 routing follow cpuinfo, not the forced ISA (spec §2, §3)
        cases = [c for c in cases if realkernel.forced_mismatch(mode, engine, realkernel.case_convs([c])) is None]
    real = realkernel.run_ops(cases, mode=mode, engine=engine)

    wrong, saturating, saturated, beats_exact = [], 0, 0, 0
    for i, (c, r) in enumerate(zip(cases, real)):
        y, sat = emulator.run_case(c, engine=engine, isa=isa, want_saturation=True)
        same = y.shape == r.shape and (
            np.array_equal(y.view(np.int32), r.view(np.int32)) if y.dtype == np.float32 else np.array_equal(y, r)
        )
        if not same:
            wrong.append(
                (i, c["family"], c["op"], c["w"].shape, int(np.sum(y != r)) if y.shape == r.shape else "shape")
            )
        if not c["full"]:
            assert sat.count == 0, f"case {i} ({c['family']}): data in [0,127] cannot saturate"
        elif kernel_of(c, engine, isa).saturates:
            saturating += 1
            saturated += sat.count > 0
            if sat.count and not np.array_equal(emulator.run_case(c, engine=engine, isa=isa, exact=True), r):
                beats_exact += 1
    assert not wrong, f"{len(wrong)}/{len(cases)} cases differ from the real kernels: {wrong}"
    if saturating >= 4:  # the comparison must exercise saturation, and it must matter
        assert saturated >= saturating // 2, (saturated, saturating)
        assert beats_exact > 0


NATIVE = [
    ("native", "fbgemm"),
    ("native", "x86"),
    ("native", "onednn"),
    ("avx2", "fbgemm"),
    ("avx2", "onednn"),
    ("avx512", "fbgemm"),
    ("avx512", "onednn"),
    ("avx512", "x86"),
]


@pytest.mark.parametrize(
    "mode,engine", [pytest.param(*me, marks=mode_param(me[0]).marks, id="-".join(me)) for me in NATIVE]
)
def test_bit_exact_native(mode, engine):
    check_bit_exact(mode, engine, per_family=6)


@pytest.mark.qemu
@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
@pytest.mark.skipif(not realkernel.available("haswell"), reason="qemu-x86_64 not on PATH")
def test_bit_exact_qemu_haswell(engine):
    check_bit_exact("haswell", engine, per_family=2)
