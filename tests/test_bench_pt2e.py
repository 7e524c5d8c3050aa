"""Plumbing of benchmarks/bench_pt2e.py on a toy CNN: the three flows, the verbose parser, the report."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safeobs.pt2e", reason="torchao is not installed")

import safeobs  # noqa: E402
from safeobs import pt2e  # noqa: E402
from safeobs.kernels import realkernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_pt2e as bp  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    task = bp.toy_task(n_calib=8, n_held=4, batch=4)
    calibration = task.calib_fn(0)
    return task, calibration, bp.quantize_draw(task, calibration, rtn_alone=True)


def test_draws_are_deterministic_distinct_and_held_out_is_fixed():
    assert bp._subset(120, 32, 0) == bp._subset(120, 32, 0) != bp._subset(120, 32, 1)
    assert len(set(bp._subset(120, 32, 3))) == 32 and bp._even(80, 24) == bp._even(80, 24)


def test_flows_match_the_one_call_and_only_safeobs_is_safe(toy):
    task, calibration, q = toy
    assert set(q["models"]) == set(bp.CONFIGS) and q["rtn_same"] is True
    one_call = safeobs.quantize_pt2e(task.exported, task.example, calibration)
    got, want = bp._weights(q["models"]["safeobs data-aware"]), bp._weights(one_call)
    assert got.keys() == want.keys() and len(got) == 3
    assert all(torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1]) for k in got)
    rtn = bp._weights(q["models"]["safeobs RTN"])
    assert any(not torch.equal(rtn[k][0], got[k][0]) for k in got)  # the rounding did change codes
    assert q["violations"]["stock"] > 0 and q["violations"]["safeobs RTN"] == q["violations"]["safeobs data-aware"] == 0
    assert pt2e.verify(q["models"]["safeobs data-aware"]).ok
    assert all(t > 0 for t in q["times"].values())


def test_float_weight_ceiling_reads_every_float_weight(toy):
    """The ceiling model: the same activation quantization, no int8 weight left, and eager metrics for it."""
    _, _, q = toy
    task = bp.toy_task(n_calib=8, n_held=4, batch=4)  # a fresh export (quantize_pt2e prepares its input in place)
    calibration = task.calib_fn(0)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from safeobs.pt2e import rounding

    p = prepare_pt2e(
        copy.deepcopy(task.exported),
        pt2e.X86InductorQuantizer().set_global(pt2e.get_x86_inductor_quantization_config()),
    )
    stats = rounding.calibrate_pt2e(p, calibration, progress=False)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(p)
    ceiling = bp.float_weights(converted, stats)
    assert len(list(pt2e.quantized_weights(converted))) == 3 and not list(pt2e.quantized_weights(ceiling))
    ops = {n.target for n in ceiling.graph.nodes}
    assert torch.ops.quantized_decomposed.quantize_per_tensor.default in ops  # activations still quantized
    x = task.held[0]
    with torch.no_grad():
        assert not torch.equal(ceiling(x), converted(x)) and not torch.equal(ceiling(x), task.model(x))
    assert set(q["eager"]) == {*bp.CONFIGS, bp.OBSERVER, bp.PREVIOUS, bp.CEILING} and all(
        "sqnr" in m for m in q["eager"].values()
    )


def test_verbose_parser_keeps_int8_primitives_only():
    text = "\n".join(
        [
            "onednn_verbose,v1,info,cpu,isa:Intel AVX2",
            "onednn_verbose,v1,primitive,exec,cpu,convolution,jit_uni_int8:avx2,forward_inference,"
            "src:u8::blocked:acdb::f0 wei:s8:p:blocked:AcdB24a4b::f0,,mb4_ic3oc16,0.1",
            "onednn_verbose,v1,primitive,exec,cpu,convolution,jit_uni_int8:avx2,forward_inference,src:u8::blocked:acdb::f0,,x,0.1",
            "onednn_verbose,v1,primitive,exec,cpu,reorder,simple:any,undef,src:f32::blocked:abcd::f0 dst:u8,,x,0.1",
            "onednn_verbose,v1,primitive,create:cache_hit,cpu,matmul,gemm:jit,undef,src:u8::blocked:ab::f0,,x,0.1",
        ]
    )
    assert bp._verbose_impls(text) == {"convolution jit_uni_int8:avx2": 2}
    assert bp._isa_line(text) == "Intel AVX2"


@pytest.mark.parametrize("host", ["avx2", "avx512", "vnni"])
def test_columns_never_claim_an_unreachable_vnni(host):
    cols = bp.kernel_columns(host, "Some CPU")
    assert set(cols) >= {"AVX2", "VNNI"}
    if host == "vnni":
        assert cols["VNNI"][0] == "native" and cols["AVX2"] == ("avx2", cols["AVX2"][1])
        assert "forced to AVX2" in cols["AVX2"][1] and "Some CPU" in cols["AVX2"][1]
    else:
        assert cols["VNNI"][0] is None and "not run here" in cols["VNNI"][1]


@pytest.mark.slow
@pytest.mark.skipif(not realkernel.available("avx2"), reason="needs an x86 host with AVX2")
def test_smoke_run_writes_the_table_and_safeobs_is_isa_independent(tmp_path):
    """The whole script (--smoke: toy CNN, 1 draw): quantize, two compile workers, report, plot, json."""
    bp.main(["--smoke", "--held", "8", "--calib", "8", "--batch", "4", "--out", str(tmp_path)])
    text = (tmp_path / "pt2e.md").read_text()
    assert all(f"| {k} |" in text for k in bp.CONFIGS) and (tmp_path / "pt2e.png").stat().st_size > 0
    import json

    res = json.loads((tmp_path / "pt2e.json").read_text())
    r = res["results"][0]
    ran = [c for c, (mode, _) in res["columns"].items() if mode is not None]
    assert "AVX2" in ran and all(len(r["rows"]["safeobs data-aware"][c]) == 1 for c in ran)
    if "VNNI" in ran:  # forced AVX2 really ran oneDNN's AVX2 int8 kernels; safe weights give the same logits
        assert r["impls"]["AVX2"] and all("avx2" in k or "gemm:jit" in k for k in r["impls"]["AVX2"])
        assert any("vnni" in k for k in r["impls"]["VNNI"])
        for k in ("safeobs RTN", "safeobs data-aware"):
            assert r["avx2_vs_vnni"][0][k] < 1e-5, r["avx2_vs_vnni"]
        assert any("within 0.1 dB" in t[0] and t[1] for t in res["targets"])
