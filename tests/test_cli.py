"""Acceptance tests of the ``safeobs`` command: demo, audit, repair (issue 5)."""

from __future__ import annotations

import copy
import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import mode_param
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from safeobs import cli, data
from safeobs.data import models
from safeobs.emulator import emulate
from safeobs.kernels import realkernel
from safeobs.tools import demo, realrun, runtimes, serialization
from safeobs.tools.repair import repair
from safeobs.tools.verify import verify

MODNAME = "_safeobs_cli_models"


@pytest.fixture(scope="module")
def converted():
    """MobileNetV2 converted with torch's default x86 mapping, calibrated on 4 photos."""
    torch.backends.quantized.engine = "x86"
    calib = data.photos("calib")[::30][:4]
    p = prepare_fx(models.mobilenet_v2(), get_default_qconfig_mapping("x86"), (calib[:1],))
    with torch.no_grad():
        p(calib)
    return convert_fx(p)


@pytest.fixture(scope="module")
def photo():
    return data.photos("heldout")[:1]


@pytest.fixture(scope="module")
def script_path(converted, photo, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mnv2_torch.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(converted, photo), str(path))
    return str(path)


@pytest.fixture(scope="module")
def modspec(converted):
    """``module:function`` returning a fresh copy of the eager converted model."""
    mod = types.ModuleType(MODNAME)
    mod.converted = lambda: copy.deepcopy(converted)
    mod.not_a_model = lambda: 42
    sys.modules[MODNAME] = mod
    yield f"{MODNAME}:converted"
    del sys.modules[MODNAME]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``safeobs argv``."""
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ help and usage errors
@pytest.mark.parametrize("sub", [[], ["demo"], ["audit"], ["repair"]])
def test_help(capsys, sub):
    with pytest.raises(SystemExit) as e:
        cli.main(sub + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "safeobs" in out


def test_usage_errors(capsys, tmp_path, script_path, modspec):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    cases = [
        ["audit", str(tmp_path / "missing.pt")],
        ["audit", str(junk)],
        ["audit", str(junk), "--trust-pickle"],
        ["audit", script_path],  # TorchScript: needs --trust-pickle
        ["audit", str(tmp_path)],
        ["audit", "no_such_module_xyz:f"],
        ["audit", f"{MODNAME}:nope"],
        ["audit", f"{MODNAME}:not_a_model"],
        ["audit", script_path, "--engines", "x86/sse2", "--trust-pickle"],
        ["audit", script_path, "--inputs", str(tmp_path / "none.pt"), "--trust-pickle"],
        ["audit", script_path, "--inputs", str(junk), "--trust-pickle"],
        ["audit", script_path, "--photos", "0", "--trust-pickle"],
        ["repair", script_path, "-o", str(tmp_path / "no" / "dir.pt"), "--trust-pickle"],
        ["repair", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt")],
        ["demo", "--eval", "0"],
        [],
    ]
    for argv in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2, argv
        assert "Traceback" not in err and out == "", argv
        if argv:
            assert len(err.strip().splitlines()) == 1 and "error:" in err, (argv, err)
    for argv in (["audit"], ["repair", script_path], ["frobnicate"], ["audit", script_path, "--photos", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


# ------------------------------------------------------------------ demo
def test_demo_quick(capsys):
    rc, out, _ = run(capsys, "demo", "--quick", "--json", "-q")
    assert rc == 0
    res = json.loads(out)
    rows = {(r["layer"], r["scenario"], r["setup"]): r for r in res["rows"]}
    assert len(rows) == len(demo.LAYERS) * len(demo.SCENARIOS) * len(demo.SETUPS)
    mode = res["mode"]
    assert mode == ("native" if realkernel.host_isa() == "avx2" else realkernel.mode_for("avx2", "fbgemm"))
    for r in res["rows"]:
        if mode is not None:
            assert r["real_equals_emulator"] is True, r  # the emulator models the real kernel bit for bit
        if r["setup"] == "safeobs":  # never saturates, keeps 8-bit activations
            assert r["saturated_outputs"] == 0 and r["saturated_lanes"] == 0 and r["act_bits"] == 8
            assert r["real_equals_exact"] in (True, None) and r["op_error_lsb"] <= 1
            assert r["bits_kept_mean"] > 7.2
        if r["setup"] == "7-bit weights":
            assert r["saturated_outputs"] == 0 and r["bits_kept_min"] < 7.01
    # the forum's report: full 8-bit activations with torch's weights give bad outputs on the stem conv ...
    full = rows[("features.0.0", "held-out", "full-range 8-bit")]
    assert full["saturated_outputs"] > 1000 and full["op_error_lsb"] > 10
    assert rows[("features.2.conv.1.0", "held-out x2", "full-range 8-bit")]["saturated_outputs"] > 0
    # ... and torch's default (7-bit activations) saturates too once inputs leave the calibrated range
    assert rows[("features.0.0", "held-out", "torch x86 default")]["saturated_outputs"] == 0
    assert rows[("features.0.0", "held-out x2", "torch x86 default")]["saturated_outputs"] > 1000
    # safeobs beats torch's default on the calibrated range (8-bit activations) at full accuracy
    for layer in demo.LAYERS:
        assert (
            rows[(layer, "held-out", "safeobs")]["output_sqnr_db"]
            > rows[(layer, "held-out", "torch x86 default")]["output_sqnr_db"]
        )
    text = demo.format_demo(res)
    assert "features.0.0:" in text and "features.2.conv.1.0:" in text and "safeobs" in text


# ------------------------------------------------------------------ audit
def test_audit_torchscript_json_and_exit_codes(capsys, script_path, tmp_path):
    rc, out, _ = run(capsys, "audit", script_path, "--json", "-q", "--trust-pickle")
    assert rc == 1
    res = json.loads(out)
    assert res["source"] == "torchscript" and res["unsafe"] and res["saturation"] is None
    assert len(res["layers"]) == 53 and "features.0.0" in res["unsafe_layers"]
    stem = next(lay for lay in res["layers"] if lay["name"] == "features.0.0")
    k = stem["kernels"]["x86/avx2"]
    assert (k["backend"], k["path"], k["saturates"]) == ("fbgemm", "im2col", True) and k["violating_pairs"] > 0
    ch, worst = next(iter(k["per_channel"].items()))
    assert sum(c for c in worst["codes"] if c > 0) > 128 or sum(c for c in worst["codes"] if c < 0) < -128
    assert stem["kernels"]["x86/vnni"]["saturates"] is False  # oneDNN VNNI: exact
    dw = next(lay for lay in res["layers"] if lay["name"] == "features.3.conv.1.0")  # 144 groups > 100
    assert dw["kernels"]["x86/vnni"]["path"] == "depthwise" and dw["kernels"]["x86/vnni"]["channels"]
    # human table, and the TorchScript note when data is given
    rc, out, _ = run(capsys, "audit", script_path, "--photos", "1", "--unsafe-only", "-q", "--trust-pickle")
    assert rc == 1 and "features.0.0" in out and "UNSAFE" in out and "TorchScript" in out


def test_audit_eager_with_inputs_counts_saturation(capsys, modspec, photo, tmp_path):
    inputs = tmp_path / "x.pt"
    torch.save((photo,), inputs)
    # x4: far beyond the calibrated range, the "7-bit" activation codes reach 255
    rc, out, _ = run(
        capsys,
        "audit",
        modspec,
        "--inputs",
        str(inputs),
        "--input-scale",
        "4",
        "--engines",
        "x86/avx2,x86/vnni",
        "--json",
        "-q",
    )
    assert rc == 1
    res = json.loads(out)
    sat = res["saturation"]
    assert sat["x86/avx2"]["total"] > 0 and sat["x86/avx2"]["layers"]["features.0.0"] > 0
    assert sat["x86/vnni"]["layers"]["features.0.0"] == 0  # oneDNN VNNI conv is exact


# ------------------------------------------------------------------ repair
def _qparams(w):
    if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return np.array([w.q_scale()]), np.array([w.q_zero_point()])
    return w.q_per_channel_scales().numpy(), w.q_per_channel_zero_points().numpy()


def test_repair_torchscript(capsys, script_path, tmp_path):
    out_path = str(tmp_path / "safe.pt")
    rc, out, _ = run(capsys, "repair", script_path, "-o", out_path, "--json", "-q", "--trust-pickle")
    assert rc == 0
    infos = {i["name"]: i for i in json.loads(out)["layers"]}
    assert infos["features.0.0"]["changed"] > 0
    before = {lay.name: lay for lay in runtimes.layers(torch.jit.load(script_path))}
    after_model = torch.jit.load(out_path)
    after = {lay.name: lay for lay in runtimes.layers(after_model)}
    assert before.keys() == after.keys() == infos.keys()
    for name, b in before.items():
        a, info = after[name], infos[name]
        cb, ca = b.weight.int_repr().numpy(), a.weight.int_repr().numpy()
        (sb, zb), (sa, za) = _qparams(b.weight), _qparams(a.weight)
        keep = np.ones(len(sb), bool)
        keep[info["changed_channels"]] = False
        assert np.array_equal(cb[keep], ca[keep]) and np.array_equal(sb[keep], sa[keep])
        assert np.array_equal(zb, za)
        assert (sa[~keep] > sb[~keep]).all()  # changed channels got a coarser scale, nothing else
        assert torch.equal(b.bias, a.bias) if b.bias is not None else a.bias is None
        assert b.module.code == a.module.code  # output scale / zero point are constants of the call
    assert not verify(torch.jit.load(script_path)).ok and verify(after_model).ok
    rc, out, _ = run(capsys, "audit", out_path, "--json", "-q", "--trust-pickle")  # TorchScript stays TorchScript
    assert rc == 0 and json.loads(out)["unsafe_layers"] == []


def test_repair_leaves_safe_layers_identical(tmp_path, converted):
    model = copy.deepcopy(converted)
    first = {i["name"]: i for i in repair(model)}
    assert any(i["changed"] for i in first.values())
    snap = {lay.name: (lay.weight.int_repr().clone(), _qparams(lay.weight), lay.bias) for lay in runtimes.layers(model)}
    second = repair(model)  # already safe: nothing moves
    assert not any(i["changed"] for i in second)
    for lay in runtimes.layers(model):
        codes, (s, z), bias = snap[lay.name]
        assert torch.equal(codes, lay.weight.int_repr())
        assert np.array_equal(s, _qparams(lay.weight)[0]) and np.array_equal(z, _qparams(lay.weight)[1])
        assert bias is lay.bias or torch.equal(bias, lay.bias)


def test_repair_module_function(capsys, modspec, tmp_path):
    traced, state = str(tmp_path / "t.pt"), str(tmp_path / "s.pt")
    rc, out, _ = run(capsys, "repair", modspec, "-o", traced, "--photos", "1", "-q")
    assert rc == 0 and "saved torchscript" in out and "features.0.0" in out
    # without example inputs an eager model (FX GraphModule too) becomes a state file: audited with no flag
    rc, out, _ = run(capsys, "repair", modspec, "-o", state, "-q")
    assert rc == 0 and "saved state" in out
    rc, out, _ = run(capsys, "audit", state, "--json", "-q")
    assert rc == 0 and json.loads(out)["source"] == "state" and len(json.loads(out)["layers"]) == 53
    assert torch.load(state, weights_only=True)["arch"] == modspec  # recorded, never imported on its own
    pickled = str(tmp_path / "p.pt")
    eager = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 8)))
    torch.save(eager, pickled)
    rc, out, err = run(capsys, "repair", pickled, "-o", pickled, "-q")
    assert rc == 2 and "--trust-pickle" in err
    rc, out, _ = run(capsys, "repair", pickled, "-o", pickled, "-q", "--trust-pickle")
    assert rc == 0 and "saved state" in out
    for path, source in ((traced, "torchscript"), (pickled, "state"), (state, "state")):
        model, src = serialization.load_model(path, trust_pickle=source == "torchscript")
        assert src == source and verify(model).ok
        rc, _, _ = run(capsys, "audit", path, "-q", *(["--trust-pickle"] if source == "torchscript" else []))
        assert rc == 0
    model, src = serialization.load_model(state, arch=modspec)  # the eager model again, repaired weights in it
    assert src == "state_dict" and verify(model).ok


@pytest.fixture(scope="module")
def repaired(converted, photo, tmp_path_factory):
    """(path of the repaired model as TorchScript, inputs, exact-emulation outputs)."""
    model = copy.deepcopy(converted)
    repair(model)
    path = tmp_path_factory.mktemp("rep") / "mnv2_safe.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, photo), str(path))
    x = [photo.numpy(), (photo * 2).numpy()]  # in and beyond the calibrated range
    with torch.no_grad(), emulate(model, engine="x86", isa="avx2", exact=True):
        ref = [model(torch.from_numpy(a)).numpy() for a in x]
    return path, x, ref


@pytest.mark.parametrize("route", ["fastest", pytest.param("haswell", marks=mode_param("haswell").marks)])
def test_repaired_model_bit_exact_on_avx2(repaired, route):
    """The real kernels of an AVX2 CPU: native on an AVX2 host, forced AVX2 where that reaches them, qemu."""
    path, x, ref = repaired
    mode = (
        "haswell"
        if route == "haswell"
        else realkernel.mode_for("avx2", "x86", realrun.model_convs(torch.jit.load(str(path))))
    )
    got = realrun.run_module(path, x, mode=mode, engine="x86", trust_pickle=True)  # the test's own TorchScript
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_audit_pickled_model_with_quantized_convs(capsys, tmp_path):
    """torch.save'd eager models: torch's quantized convs unpickle without their nn.Module tables (their
    __setstate__ is TorchScript's); audit restores them instead of failing with a traceback."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86"
    model = torch.nn.Sequential(nnq.Conv2d(3, 8, 3), nnq.Conv2d(8, 4, 1)).eval()
    w = torch.full((8, 3, 3, 3), 127 * 0.01)  # every pair at +127, +127: unsafe on AVX2
    model[0].set_weight_bias(torch.quantize_per_tensor(w, 0.01, 0, torch.qint8), None)
    w = torch.full((4, 8, 1, 1), 60 * 0.01)  # pairs at +60, +60: safe
    model[1].set_weight_bias(torch.quantize_per_tensor(w, 0.01, 0, torch.qint8), None)
    whole, bare = tmp_path / "whole.pt", tmp_path / "conv.pt"
    torch.save(model, whole)
    torch.save(model[1], bare)
    rc, out, _ = run(capsys, "audit", str(whole), "--json", "-q", "--trust-pickle")
    res = json.loads(out)
    assert rc == 1 and res["source"] == "pickle" and res["unsafe_layers"] == ["0"] and len(res["layers"]) == 2
    rc, out, _ = run(capsys, "audit", str(bare), "--json", "-q", "--trust-pickle")
    assert rc == 0 and [lay["kind"] for lay in json.loads(out)["layers"]] == ["conv2d"]
    loaded, source = serialization.load(str(whole), trust_pickle=True)
    x = torch.quantize_per_tensor(torch.rand(1, 3, 8, 8), 1 / 255, 0, torch.quint8)
    assert source == "pickle" and torch.equal(loaded(x).int_repr(), model(x).int_repr())  # it still runs
