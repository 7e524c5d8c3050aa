"""Plumbing of benchmarks/bench_openvino.py: the target logic, and a ``--smoke`` run (truncated MobileNetV2 on
64x64 photo crops, the real plugin natively and under qemu Haswell; about 40 s)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_openvino as bo  # noqa: E402
from conftest import requires_qemu  # noqa: E402


def test_sqnr_and_agreement_helpers():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 10))
    noisy = ref + 0.01 * rng.standard_normal(ref.shape)
    assert bo.sqnr(ref, ref) == float("inf")
    assert 35 < bo.sqnr(ref, noisy) < 45  # noise 100x below unit-variance signal: ~40 dB
    assert bo.agreement(ref, ref) == 1.0 and bo.agreement(ref, -ref) == 0.0
    assert bo.cosine(ref, 3 * ref) == pytest.approx(1.0) and bo.cosine(ref, -ref) == pytest.approx(-1.0)
    idx = bo.spread(80, 16)
    assert len(idx) == 16 and idx[0] == 0 and idx[-1] == 79 and np.all(np.diff(idx) > 0)


def _res(avx2: dict, native: dict, dist: dict, unsafe: int, isa="vnni"):
    rows = []
    for c in bo.CONFIGS:
        row = {"config": c, "avx2": {"sqnr": avx2[c]}, "native_subset": {"sqnr": native[c]}, "avx2_vs_native": dist[c]}
        if c != "FP32":
            row["audit"] = {
                f"unsafe_channels_{i}": (unsafe if c == "safeobs" and i == "avx2" else 0) for i in bo.sov.ISAS
            }
        rows.append(row)
    return {"rows": rows, "qemu": True, "native_isa": isa}


def test_targets_met_and_missed():
    inf = float("inf")
    nat = {"FP32": inf, "NNCF DISABLE": 20.0, bo.BASE: 19.8, "NNCF ENABLE": 19.0, "safeobs": 19.9}
    avx2 = {"FP32": inf, "NNCF DISABLE": 7.0, bo.BASE: 17.0, "NNCF ENABLE": 19.0, "safeobs": 19.9}
    dist = {"FP32": 130.0, "NNCF DISABLE": 7.0, bo.BASE: 19.0, "NNCF ENABLE": inf, "safeobs": inf}
    assert [t["met"] for t in bo.targets(_res(avx2, nat, dist, 0))] == [True, True, True, True]
    # 0.3 dB above ENABLE on AVX2 is needed, 0.2 dB below DISABLE on VNNI allowed; a saturating channel fails
    worse = dict(avx2, safeobs=19.2)
    met = [t["met"] for t in bo.targets(_res(worse, dict(nat, safeobs=19.2), dist, 3))]
    assert met == [False, False, True, False]
    # an AVX2-only host: native is AVX2, no "VNNI" target and no AVX2-vs-native target
    assert [t["target"][:28] for t in bo.targets(_res(avx2, nat, dist, 0, isa="avx2"))] == [
        "safeobs on AVX2 >= best NNCF",
        "safeobs: 0 int8 channels who",
    ]


@pytest.mark.slow
@pytest.mark.qemu
@requires_qemu
def test_smoke_run_writes_results(tmp_path):
    bo.main(
        ["--smoke", "--no-probes", "--out", str(tmp_path), "--qemu-photos", "4", "--rounds", "2", "--per-round", "1"]
    )
    for ext in ("md", "png", "json"):
        assert (tmp_path / f"openvino.{ext}").stat().st_size > 0
    res = json.loads((tmp_path / "openvino.json").read_text())["results"][0]
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == list(bo.CONFIGS)
    assert rows["FP32"]["avx2"]["sqnr"] > 60  # FP32 reference of the AVX2 column ran under qemu and is itself FP32
    safe, stock = rows["safeobs"], rows["NNCF DISABLE"]
    assert all(safe["audit"][f"unsafe_channels_{i}"] == 0 for i in bo.sov.ISAS)
    assert stock["audit"]["unsafe_channels_avx2"] > 0  # real MobileNetV2 weights at 8 bits: pairs past 128
    assert any(k.startswith("jit_avx2") for k in safe["avx2_kernels"])  # the AVX2 column ran AVX2 kernels
    if res["native_isa"] == "vnni":  # exact int8 natively: the safe model is bit-identical on AVX2, stock is not
        assert safe["avx2_eq_native"] and not stock["avx2_eq_native"]
    md = (tmp_path / "openvino.md").read_text()
    assert "Host:" in md and "qemu-x86_64 -cpu Haswell" in md and "| target |" in md
