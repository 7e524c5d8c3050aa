"""Issue 20 at scale: the streaming audit equals the old materialising one; audit, verify and quantize_ go
layer by layer with progress; ``safeobs audit --json`` on a torchao model file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safeobs.kernels import dispatch
from safeobs.kernels.layout import kernel_order, kernel_pairs
from safeobs.tools import audit as audit_mod
from safeobs.tools import runtimes


def old_pair_violations(codes, kernel, op, groups, isa):
    """safeobs.tools.audit.pair_violations before issue 20: (OC, n) index arrays of every pair of the kernel."""
    shape = codes.shape
    pos = kernel_pairs(kernel, shape, op, groups, isa)
    oc = int(np.prod(kernel_order(shape, op, groups).shape[:2]))
    if len(pos) == 0:
        return {
            "pairs": 0,
            "violating_pairs": 0,
            "channels": [],
            "per_channel": {},
            "worst_positive": None,
            "worst_negative": None,
        }
    order = kernel_order(shape, op, groups).reshape(oc, -1)
    ia, ib = order[:, pos[:, 0]], order[:, pos[:, 1]]
    flat = codes.astype(np.int64).ravel()
    a, b = flat[ia], flat[ib]
    psum = np.maximum(a, 0) + np.maximum(b, 0)
    nsum = np.minimum(a, 0) + np.minimum(b, 0)
    excess = np.maximum(psum - 128, -128 - nsum)
    bad = excess > 0
    count = bad.sum(axis=1)
    chans = np.flatnonzero(count)
    worst = excess.argmax(axis=1)[chans]
    per_channel = {
        int(c): {
            "violating_pairs": int(count[c]),
            "indices": [int(ia[c, k]), int(ib[c, k])],
            "codes": [int(a[c, k]), int(b[c, k])],
        }
        for c, k in zip(chans, worst)
    }
    return {
        "pairs": int(pos.shape[0]) * oc,
        "violating_pairs": int(count.sum()),
        "channels": chans.tolist(),
        "per_channel": per_channel,
        "worst_positive": int(psum.max()),
        "worst_negative": int(nsum.min()),
    }


def _kernels(shape, op, groups):
    """Every kernel audit reports for this weight: each engine/ISA column, and the torchao columns."""
    out = {}
    for engine in dispatch.ENGINES:
        for isa in dispatch.ISAS:
            if op == "linear":
                k = dispatch.linear_kernel(engine, isa)
            else:
                k = dispatch.conv_kernel(engine, isa, shape, groups=groups, transposed=op == "conv_transpose")
            out[f"{engine}/{isa}"] = (k, isa)
    if op == "linear":
        from safeobs.kernels.dispatch import Kernel

        for isa in dispatch.ISAS:  # torchao's oneDNN matmul (safeobs.torchao.adapter.kernel_for)
            out[f"matmul/{isa}"] = (Kernel("onednn", "matmul", isa != "vnni"), isa)
    for path in ("relo", "relo_wi", "relo_whi", "gemm", "conv"):  # every oneDNN pairing, whatever dispatch picks
        if op == "conv" and (path != "relo_whi" or shape[1] == 1):
            for isa in ("avx2", "avx512"):
                out[f"{path}/{isa}"] = (dispatch.Kernel("onednn", path, True), isa)
    return out


kernel_size = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)
layer_shapes = st.one_of(
    st.builds(lambda n, k: ("linear", (n, k), 1), st.integers(1, 5), st.integers(1, 1600)),
    st.builds(
        lambda n, k: ("linear", (n, k), 1),
        st.integers(1, 3),
        st.sampled_from([255, 256, 257, 383, 385, 511, 767, 769, 1151, 1537]),
    ),
    st.builds(
        lambda g, ocg, icg, k: ("conv", (g * ocg, icg) + k, g),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(1, 5),
        kernel_size,
    ),
    st.builds(
        lambda g, icg, ocg, k: ("conv_transpose", (g * icg, ocg) + k, g),
        st.integers(1, 3),
        st.integers(1, 4),
        st.integers(1, 3),
        kernel_size,
    ),
)


@settings(max_examples=80, deadline=None)
@given(layer_shapes, st.integers(0, 2**32 - 1), st.sampled_from([np.int8, np.int32]), st.integers(1, 3))
def test_pair_violations_equal_the_old_implementation(case, seed, dtype, chunk_scale):
    """Counts, channels, worst sums and the worst pair of every channel, for every kernel audit reports, on
    hypothesis-drawn small shapes (int8 codes and wider ones, chunks smaller than a row)."""
    op, shape, groups = case
    rng = np.random.default_rng(seed)
    lo, hi = (-128, 128) if dtype == np.int8 else (-300, 300)
    codes = np.clip(np.round(rng.standard_t(3, size=shape) * 45), lo, hi - 1).astype(dtype)
    for name, (k, isa) in _kernels(shape, op, groups).items():
        old = old_pair_violations(codes, k, op, groups, isa)
        for chunk in (7 * chunk_scale, 1 << 18):
            new = audit_mod.pair_violations(codes, k, op, groups, isa, chunk=chunk)
            assert new == old, (name, shape, op, groups, chunk)


def test_pair_violations_bounds_the_per_channel_details():
    codes = np.full((50, 64), 100, dtype=np.int8)  # every pair sums to 200: all 50 channels violate
    k = dispatch.Kernel("fbgemm", "gemm", True)
    full = audit_mod.pair_violations(codes, k, "linear", 1, "avx2")
    cut = audit_mod.pair_violations(codes, k, "linear", 1, "avx2", max_channels=8, chunk=64 * 3)
    assert full["channels"] == cut["channels"] == list(range(50))
    assert cut["per_channel"] == {c: full["per_channel"][c] for c in range(8)}
    assert cut["per_channel_omitted"] == 42 and cut["violating_pairs"] == full["violating_pairs"] == 50 * 32
    with pytest.raises(ValueError, match="max_channels"):
        audit_mod.pair_violations(codes, k, "linear", 1, "avx2", max_channels=-1)
    with pytest.raises(TypeError, match="integers"):
        audit_mod.pair_violations(codes.astype(np.float32), k, "linear", 1, "avx2")


# -- torchao models: audit, verify and quantize_ layer by layer -------------------------------------------


@pytest.fixture(scope="module")
def torchao_model():
    """Stock torchao quantize_ of two Linears whose rows all hold a pair of large adjacent weights: every
    output channel violates on oneDNN's AVX2 matmul (compiled/avx2)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 32)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight[:, 2:4] = 1.0  # the row maximum twice: codes (127, 127) in one pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def test_audit_reads_torchao_layers_without_copies(torchao_model, monkeypatch):
    """audit and verify read each Int8Tensor's own codes: the qint8 copy (as_qtensor) is never built."""
    import safeobs
    import safeobs.torchao as sto

    expected = [lay.codes.copy() for lay in runtimes.layers(torchao_model)]
    assert [e.shape for e in expected] == [(300, 64), (32, 300)]
    calls = []
    monkeypatch.setattr(sto, "as_qtensor", lambda w: calls.append(w) or pytest.fail("copied the codes"))
    result = audit_mod.audit(torchao_model)
    report = safeobs.verify(torchao_model)
    assert not calls
    k = {lay["name"]: lay["kernels"]["compiled/avx2"] for lay in result["layers"]}
    assert k["0"]["channels"] == list(range(300)) and k["2"]["channels"] == list(range(32))
    assert [lay["qscheme"] for lay in result["layers"]] == ["per_channel_affine"] * 2
    assert {v.module for v in report.violations} == {"0", "2"}
    for lay, codes in zip(runtimes.layers(torchao_model), expected):  # read-only views of the model's codes
        assert np.array_equal(lay.codes, codes) and not lay.codes.flags.writeable


def test_audit_progress_per_layer_for_large_models(torchao_model, monkeypatch):
    seen = []
    audit_mod.audit(torchao_model, progress=lambda i, n, label: seen.append((i, n, label.split()[0])))
    assert seen == []  # below progress.LARGE weights: no per-layer progress
    monkeypatch.setattr(audit_mod, "LARGE", 1)
    audit_mod.audit(torchao_model, progress=lambda i, n, label: seen.append((i, n, label.split()[0])))
    assert seen == [(1, 2, "0"), (2, 2, "2")]


def test_verify_and_quantize_progress_bars(torchao_model, capsys):
    """progress=True draws one step per layer on stderr; None stays silent off a terminal."""
    import safeobs
    import safeobs.torchao as sto

    safeobs.verify(torchao_model, progress=True)
    assert "safeobs verify" in capsys.readouterr().err
    safeobs.verify(torchao_model)
    assert capsys.readouterr().err == ""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)).eval()
    sto.quantize_(model, progress=True)
    err = capsys.readouterr().err
    assert "safeobs.torchao quantize_" in err and "2/2" in err and "16x64 (" in err
    calib = [(torch.randn(4, 32),) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)).eval()
    sto.quantize_(model, calibration=calib, progress=True)
    err = capsys.readouterr().err
    assert "calibration" in err and "3/3" in err and "(data-aware)" in err
    assert safeobs.verify(model).ok and set(model._safeobs_rounding) == {"0", "1"}
    with pytest.raises(TypeError, match="progress"):
        sto.quantize_(model, progress="yes")


def test_data_aware_quantize_streams_one_layer_at_a_time(monkeypatch):
    """Each Linear is quantized (torchao's handler: the RTN base) and rounded before the next one is touched (no
    second copy of every layer), and the result equals rounding every layer on the float model's statistics."""
    import safeobs.torchao as sto
    from safeobs.core import rounding

    def net():
        return torch.nn.Sequential(
            torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48), torch.nn.GELU(),
            torch.nn.Linear(48, 48), torch.nn.GELU(), torch.nn.Linear(48, 16),
        ).eval()  # fmt: skip

    torch.manual_seed(1)
    model = net()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [(torch.randn(8, 32),) for _ in range(2)]
    seen = []
    real = sto.round_weight

    def spy(w, h, **kw):
        seen.append([type(model[i].weight).__name__[0] for i in (0, 2, 4, 6)])
        return real(w, h, **kw)

    monkeypatch.setattr(sto, "round_weight", spy)
    sto.quantize_(model, calibration=calib)
    assert seen == [list("IPPP"), list("IIPP"), list("IIIP"), list("IIII")]
    # reference: every layer rounded on the float model's statistics, as before streaming
    twin = net()
    twin.load_state_dict(ref)
    stats = sto._calibrate_linears(twin, ["0", "2", "4", "6"], calib, False, share=False)
    for i in (0, 2, 4, 6):
        st = stats[str(i)]
        x4 = st.x4 / st.n
        h = sto._symmetric_h(st)
        h = rounding.shrink(h, rounding.ledoit_wolf_intensity(np.triu(h)[None], x4, st.n, upper=True))
        rtn = sto.quantize_weight(twin[i].weight.detach(), sto.Int8DynamicActivationInt8WeightConfig())
        r = rounding.round_weight(
            twin[i].weight.detach(),
            h,
            layout="x86",
            op="linear",
            bias_correction=False,
            scale=rtn.scale.float().numpy().reshape(-1),
            rtn_codes=rtn.qdata.numpy(),
        )
        assert np.array_equal(model[i].weight.qdata.numpy(), r.codes)
        assert np.array_equal(model[i].weight.scale.float().numpy().reshape(-1), r.scale)


def test_cli_audit_json_on_a_torchao_state_file(torchao_model, tmp_path, capsys):
    """safeobs audit --json of a safeobs.torchao.save file: read memory-mapped, per-channel details bounded."""
    import safeobs.torchao as sto
    from safeobs.cli import main

    path = tmp_path / "model.pt"
    sto.save(torchao_model, path)
    assert main(["audit", str(path), "--json", "-q"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "state" and out["unsafe_layers"] == ["0", "2"]
    big = out["layers"][0]["kernels"]["compiled/avx2"]
    assert len(big["channels"]) == 300 and big["violating_pairs"] >= 300
    assert len(big["per_channel"]) == audit_mod.MAX_CHANNEL_DETAILS and big["per_channel_omitted"] == 200
    ref = audit_mod.pair_violations(
        torchao_model[0].weight.qdata.numpy(), dispatch.Kernel("onednn", "matmul", True), "linear", 1, "avx2"
    )
    assert big["violating_pairs"] == ref["violating_pairs"] and big["worst_positive"] == ref["worst_positive"]
    assert big["per_channel"]["0"] == ref["per_channel"][0]
    assert out["layers"][0]["kernels"]["compiled/vnni"]["pairs"] == 0  # exact kernels: nothing to check
