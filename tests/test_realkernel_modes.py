"""safeobs.realkernel knows which kernels a mode reaches on which host (kernel-spec §2, §3).

The host is simulated by monkeypatching ``realkernel.host_isa`` (what the decisions read), so every
host kind's rules are checked on every host.  Runs that do reach a kernel are checked against the
real kernels in test_realkernel_exact.py and test_qconfig.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safeobs.kernels import realkernel
from safeobs.tools import _realrun_worker


def conv(shape, groups=1, padding=1, stride=1, symmetric=True, output_padding=0, transposed=False):
    op = "conv_transpose2d" if transposed else "conv2d"
    return realkernel._conv_facts(op, shape, groups, stride, padding, 1, output_padding, symmetric)


GROUPWISE = conv((32, 4, 3, 3), groups=8)  # cpg 4: groupwise on AVX2 (G_together 2) and AVX-512 (4)
DW = conv((32, 1, 3, 3), groups=32)
DW_WIDE = conv((208, 1, 3, 3), groups=104)  # > 100 groups: x86 keeps it on FBGEMM even on VNNI
DENSE = conv((16, 8, 3, 3))


@pytest.fixture
def host(monkeypatch):
    """Simulate a host kind; ``vbmi`` says whether its CPUID has AVX512_VBMI (Ice Lake, Zen 4: a forced
    AVX512_CORE run is then an "avx512_vbmi" CPU; Skylake-SP / Cascade Lake: "avx512")."""

    def set_host(isa, vbmi=None):
        vbmi = isa == "avx512_vbmi" if vbmi is None else vbmi
        monkeypatch.setattr(realkernel, "host_isa", lambda: isa)
        monkeypatch.setattr(realkernel, "forced_avx512_isa", lambda: "avx512_vbmi" if vbmi else "avx512")
        return isa

    return set_host


@pytest.mark.parametrize("h", ["avx512", "vnni"])
def test_forced_avx2_never_reaches_fbgemm_groupwise(h):
    asym = dict(GROUPWISE, symmetric=False)  # engine x86 keeps asymmetric convs on FBGEMM on every host
    for engine, c in (("fbgemm", GROUPWISE), ("x86", asym)):
        why = realkernel.forced_mismatch("avx2", engine, [dict(DENSE, symmetric=False), c], host=h)
        assert why and "groupwise" in why and "cpuinfo" in why, (engine, why)
    assert realkernel.forced_mismatch("avx2", "onednn", [GROUPWISE], host=h) is None  # oneDNN honours the cap


def test_forced_isa_on_vnni_host_cannot_reproduce_x86_conv_routing():
    for c in (DW, DENSE):
        why = realkernel.forced_mismatch("avx2", "x86", [c], host="vnni")
        assert why and "oneDNN" in why
    # routed to FBGEMM by both: > 100 groups, asymmetric weights, output_padding
    for c in (
        DW_WIDE,
        conv((16, 8, 3, 3), symmetric=False),
        conv((8, 8, 3, 3), transposed=True, stride=2, output_padding=1),
    ):
        assert realkernel.forced_mismatch("avx2", "x86", [c], host="vnni") is None
    assert realkernel.forced_mismatch("avx2", "x86", [DW, DENSE], host="avx512") is None  # no VNNI: all FBGEMM


def test_forcing_nothing_is_never_a_mismatch():
    assert realkernel.forced_mismatch("avx2", "fbgemm", [GROUPWISE], host="avx2") is None
    assert realkernel.forced_mismatch("native", "x86", [GROUPWISE, DW], host="vnni") is None
    assert realkernel.forced_mismatch("haswell", "x86", [GROUPWISE, DW], host="vnni") is None


@pytest.mark.parametrize(
    "h,isa,engine,convs,want",
    [
        ("avx2", "avx2", "x86", [GROUPWISE], "native"),
        ("avx2", "avx512", "fbgemm", [], None),  # qemu cannot emulate AVX-512
        ("avx2", "vnni", "fbgemm", [], None),
        ("avx512", "avx2", "fbgemm", [DENSE, DW], "avx2"),
        ("avx512", "avx2", "fbgemm", [GROUPWISE], "haswell"),
        ("avx512", "avx512", "x86", [GROUPWISE], "native"),
        ("vnni", "avx2", "x86", [DW], "haswell"),
        ("vnni", "avx2", "x86", [DW_WIDE], "avx2"),
        ("vnni", "avx2", "x86", [], "avx2"),  # Linear only: x86 runs FBGEMM everywhere
        ("vnni", "avx512", "onednn", [GROUPWISE, DW], "avx512"),
        ("vnni", "avx512", "fbgemm", [GROUPWISE], None),
        ("vnni", "vnni", "x86", [DW], "native"),
    ],
)
def test_mode_for(host, monkeypatch, h, isa, engine, convs, want):
    host(h, vbmi=False)
    monkeypatch.setattr(realkernel, "available", lambda mode: True)
    assert realkernel.mode_for(isa, engine, convs) == want


@pytest.mark.parametrize(
    "h,vbmi,isa,want",
    [
        ("vnni", True, "avx512", None),  # Zen 4 / Ice Lake forced down: relo layouts, never a Skylake-SP
        ("vnni", True, "avx512_vbmi", "avx512"),
        ("vnni", False, "avx512_vbmi", None),  # Cascade Lake has no VBMI
        ("avx512_vbmi", True, "avx512_vbmi", "native"),
        ("avx512_vbmi", True, "avx512", None),
        ("avx512", False, "avx512_vbmi", None),
        ("avx512_vbmi", True, "avx2", "avx2"),
    ],
)
def test_mode_for_avx512_kinds(host, monkeypatch, h, vbmi, isa, want):
    host(h, vbmi=vbmi)
    monkeypatch.setattr(realkernel, "available", lambda mode: True)
    assert realkernel.mode_for(isa, "onednn") == want
    if want == "avx512":
        assert realkernel.mode_isa("avx512") == isa and isa in realkernel.describe("avx512", "onednn")


def test_describe_never_labels_a_vbmi_host_forced_down_as_skylake(host):
    host("vnni", vbmi=True)
    assert realkernel.describe("avx512", "onednn") == "onednn on avx512_vbmi (vnni host forced to AVX512_CORE)"
    host("vnni", vbmi=False)
    assert realkernel.describe("avx512", "onednn") == "onednn on avx512 (vnni host forced to AVX512_CORE)"
    host("avx512_vbmi")
    assert realkernel.describe("avx512", "onednn") == "onednn on avx512_vbmi (native avx512_vbmi host)"


def test_host_isa_from_cpuinfo_flags():
    base = {"avx2", "avx512f", "avx512bw", "avx512vl"}
    assert realkernel.host_isa({"avx2"}) == "avx2"
    assert realkernel.host_isa(base) == "avx512"
    assert realkernel.host_isa(base | {"avx512vbmi"}) == "avx512_vbmi"
    assert realkernel.host_isa(base | {"avx512vbmi", "avx512_vnni"}) == "vnni"


def test_mode_for_without_qemu(host, monkeypatch):
    host("vnni")
    monkeypatch.setattr(realkernel, "available", lambda mode: mode != "haswell")
    assert realkernel.mode_for("avx2", "x86", [DW]) is None
    with pytest.raises(ValueError, match="isa"):
        realkernel.mode_for("sse4")


def _groupwise_case():
    rng = np.random.default_rng(0)
    return dict(
        op="conv2d",
        x=rng.integers(0, 256, (1, 32, 5, 5)).astype(np.uint8),
        x_scale=0.05,
        x_zp=3,
        w=rng.integers(-128, 128, (32, 4, 3, 3)).astype(np.int8),
        w_scale=0.01,
        w_zp=0,
        bias=None,
        y_scale=8.0,
        y_zp=128,
        groups=8,
        stride=1,
        padding=1,
        dilation=1,
    )


def test_run_ops_refuses_a_forced_groupwise_run_before_starting_it(host, monkeypatch):
    host("vnni")
    monkeypatch.setattr(realkernel, "_run", lambda *a, **k: pytest.fail("a subprocess was started"))
    with pytest.raises(ValueError, match="groupwise.*qemu Haswell|qemu Haswell"):
        realkernel.run_ops([_groupwise_case()], mode="avx2", engine="fbgemm")


def test_worker_refuses_a_forced_run_of_a_model_with_groupwise_convs(host, tmp_path):
    """The subprocess inspects the loaded model (eager or TorchScript) before running anything."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "fbgemm"
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)).eval()
    x = torch.rand(1, 32, 6, 6)
    prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (x,))
    prepared(x)
    path = tmp_path / "g.pt"
    torch.jit.save(torch.jit.trace(convert_fx(prepared), x), str(path))
    host("vnni")
    job = {"kind": "module", "engine": "fbgemm", "path": str(path), "inputs": [x.numpy()], "forced": "avx2"}
    out = _realrun_worker.run_module(torch, job)
    assert isinstance(out, dict) and "groupwise" in out["mismatch"]
    host("avx2")  # nothing forced on an AVX2 host: it runs
    assert _realrun_worker.run_module(torch, job)[0].shape == (1, 32, 6, 6)


def test_describe_names_the_kernel_and_how_it_was_reached(host):
    host("vnni")
    assert realkernel.describe("avx2", "fbgemm") == "fbgemm on avx2 (vnni host forced to AVX2)"
    assert realkernel.describe("haswell", "x86") == "x86 on avx2 (qemu-x86_64 -cpu Haswell)"
    assert realkernel.describe("native", "onednn") == "onednn on vnni (native vnni host)"
    host("avx2")
    assert realkernel.describe("native", "fbgemm") == "fbgemm on avx2 (native avx2 host)"
