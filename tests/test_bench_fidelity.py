"""Smoke test of benchmarks/bench_fidelity.py on a few MiniLM sentences (< 30 s)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from safeobs import data
from safeobs.data import models
from safeobs.kernels import realkernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_fidelity as bf  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    model = models.minilm().eval()
    tok = models.tokenizer()
    b = tok(data.sentences("calib")[:4])
    return model, tok, (b["input_ids"], b["attention_mask"])


def _qparams(m):
    return {
        n: (mod.scale, mod.zero_point, mod.weight().q_per_channel_scales())
        for n, mod in m.named_modules()
        if isinstance(mod, torch.ao.nn.quantized.Linear)
    }


def test_shared_calibration_equals_own_calibration(minilm):
    model, _, batch = minilm
    example = (batch[0][:1], batch[1][:1])
    torch.backends.quantized.engine = "fbgemm"
    mapping = bf.linear_only(bf.STATIC["torch-x86"][3]())
    own = prepare_fx(copy.deepcopy(model), mapping, example)
    with torch.no_grad():
        own(*batch)
    built = bf.build_static(
        model,
        example,
        [batch],
        {"torch-onednn": lambda: bf.linear_only(bf.STATIC["torch-onednn"][3]()), "torch-x86": lambda: mapping},
    )
    want, got = _qparams(convert_fx(own)), _qparams(built["torch-x86"]["fbgemm"])
    assert want.keys() == got.keys() and len(want) == 36
    for name, (s, z, w) in want.items():
        assert (s, z) == got[name][:2] and torch.equal(w, got[name][2]), name


def test_evaluate_and_report_on_dynamic_minilm(minilm, tmp_path):
    model, tok, _ = minilm
    held = data.sentences("heldout")[:3]
    with torch.no_grad():
        ref = models.embed(model, held, tok)
    qms = bf.build_dynamic(model, {k: bf.DYNAMIC[k] for k in ("dyn-8bit", "safe-dyn")})
    rows = [
        dict(
            key=k,
            cfg=bf.DYNAMIC[k],
            **bf.evaluate(qm, lambda m: models.embed(m, held, tok), ref, bf.text_metrics, exact_always=False),
        )
        for k, qm in qms.items()
    ]
    safe, stock = rows[1], rows[0]
    assert safe["sat"] == 0 and safe["avx2_eq_vnni_fbgemm"] and safe["x86_eq_fbgemm"]
    assert stock["sat"] > 0 and stock["exact_ran"]  # 8-bit inputs with stock weights saturate on AVX2
    here = realkernel.process_isa()
    if here in ("avx2", "vnni"):  # this process runs one column's real kernels (an AVX-512 host runs neither)
        assert all(r["emu_eq_native"] for r in rows)  # the emulator reproduces the real kernels, saturation included
        assert all(
            f"{here} (" in r["source"][f"{here}-fbgemm"] and "emulated" not in r["source"][f"{here}-fbgemm"]
            for r in rows
        )
    other = "vnni" if here == "avx2" else "avx2"
    assert all(r["source"][f"{other}-fbgemm"] == f"fbgemm on {other} (emulated)" for r in rows)
    assert 0.9 < safe["metrics"]["avx2-fbgemm"]["cos"] <= 1.0
    res = [dict(name="MiniLM dynamic", kind="text", rows=rows, ref="dyn-8bit", n=(0, 3))]
    targets = bf.check_targets(res)
    assert targets[0][1]  # bit-identical AVX2 vs VNNI for safeobs
    bf.write_report(res, [("safe-x86", "fbgemm", True, 1.0)], targets, 1.0, "avx2", tmp_path / "f.md")
    text = (tmp_path / "f.md").read_text()
    assert "safeobs.quantize_dynamic" in text and "emulated" in text


def test_metrics():
    a = torch.eye(4)
    assert bf.sqnr(a, a) == float("inf")
    assert bf.text_metrics(a, a)["nn"] == 1.0
    assert bf.image_metrics(a, 2 * a)["top1"] == 1.0


def test_merge_passes_takes_real_vnni_columns_and_compares_digests():
    def row(key, src, d_avx2, d_vnni, check):
        return dict(
            key=key,
            metrics={c: {"sqnr": float(len(src))} for c in bf.COLUMNS},
            source={c: src for c in bf.COLUMNS},
            digest={"avx2-fbgemm": d_avx2, "avx2-x86": d_avx2, "vnni-fbgemm": d_vnni, "vnni-x86": d_vnni},
            emu_checks={"avx2-fbgemm": True} if check is None else {"vnni-fbgemm": check, "vnni-x86": check},
        )

    avx2 = [dict(rows=[row("a", "forced avx2", "x", "y", None), row("b", "forced avx2", "p", "q", None)])]
    vnni = [dict(rows=[row("a", "native vnni", "z", "x", True), row("b", "native vnni", "r", "s", False)])]
    a, b = bf.merge_passes(avx2, vnni)[0]["rows"]
    assert a["source"]["vnni-x86"] == "native vnni" and a["source"]["avx2-fbgemm"] == "forced avx2"
    assert a["avx2_eq_vnni_fbgemm"] and a["emu_eq_native"]  # AVX2 "x" (avx2 pass) == VNNI "x" (vnni pass)
    assert not b["avx2_eq_vnni_fbgemm"] and not b["emu_eq_native"]
    assert avx2[0]["rows"][0]["source"]["vnni-x86"] == "forced avx2"  # inputs untouched
