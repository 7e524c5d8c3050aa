"""Issue 17: nothing in an inspected file runs unless the user says so (``--trust-pickle`` / ``trust_pickle=True``)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

import safeobs
from safeobs import cli
from safeobs.kernels import realkernel
from safeobs.tools import audit, realrun, repair, runtimes, serialization

nnq, nnqd = torch.ao.nn.quantized, torch.ao.nn.quantized.dynamic


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) writes a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.marker = state[0]
        t = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        self.training = state[1] and bool(t.sum() > 0)


def _model(seed=0):
    """A small converted model with one unsafe conv (groups 2), static and dynamic Linears, a conv-transpose."""
    torch.backends.quantized.engine = "x86"
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        nnq.Conv2d(4, 8, 3, groups=2), nnq.Linear(8, 4), nnqd.Linear(4, 3), nnq.ConvTranspose2d(8, 4, 3, groups=2)
    ).eval()
    w = torch.quantize_per_channel(
        torch.randn(8, 2, 3, 3, generator=g),
        torch.full((8,), 0.005).double(),
        torch.zeros(8, dtype=torch.long),
        0,
        torch.qint8,
    )
    m[0].set_weight_bias(w, torch.randn(8, generator=g))
    return m


@pytest.fixture
def evil(tmp_path):
    """(full pickle path, TorchScript path, marker): loading either file would create the marker."""
    marker = tmp_path / "pwned"
    pk = tmp_path / "evil.pt"
    torch.save(_Payload(marker), str(pk))
    ts = tmp_path / "evil_ts.pt"
    torch.jit.save(torch.jit.script(_ScriptedPayload(str(marker))), str(ts))
    assert not marker.exists()
    return str(pk), str(ts), marker


def test_payloads_are_live(evil):
    """The fixtures really run code when loaded the unsafe way (so the tests below can fail)."""
    pk, ts, marker = evil
    torch.load(pk, weights_only=False)
    assert marker.exists()
    marker.unlink()
    torch.jit.load(ts)  # TorchScript __setstate__ runs at load: torch.jit.load is not a safe loader
    assert marker.exists()


@pytest.mark.parametrize("which", ["pickle", "torchscript"])
@pytest.mark.parametrize(
    "argv",
    [
        ["audit"],
        ["audit", "--json"],
        ["audit", "--inputs", "X"],
        ["repair", "-o", "OUT"],
        ["repair", "-o", "OUT", "--inputs", "X"],
    ],
)
def test_cli_refuses_code_bearing_files(capsys, tmp_path, evil, which, argv):
    pk, ts, marker = evil
    x = tmp_path / "x.pt"
    torch.save((torch.rand(1, 4, 6, 6),), str(x))
    out = tmp_path / "out.pt"
    path = pk if which == "pickle" else ts
    args = [argv[0], path] + [str(x) if a == "X" else str(out) if a == "OUT" else a for a in argv[1:]]
    rc = cli.main(args)
    o, err = capsys.readouterr()
    assert rc == cli.EXIT_USAGE and o == ""
    assert not marker.exists() and not out.exists()
    assert "--trust-pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("full Python pickle" if which == "pickle" else "TorchScript archive") in err


def test_python_entry_points_refuse(evil, tmp_path):
    pk, ts, marker = evil
    for path in (pk, ts):
        with pytest.raises(ValueError, match="trust_pickle=True"):
            serialization.load_model(path)
        with pytest.raises(ValueError, match="trust_pickle=True"):
            safeobs.load_model(path, arch=_model)  # a user factory does not make a pickle safe
        with pytest.raises(ValueError, match="trust_pickle=True"):
            serialization.load(path)
        with pytest.raises(ValueError, match="trust_pickle=True"):
            realrun.run_module(path, [torch.rand(1, 4).numpy()])
        for fn in (audit.audit, repair.repair, safeobs.verify):
            with pytest.raises((TypeError, ValueError)):
                fn(path)
        with pytest.raises(TypeError, match="load_model"):
            repair.save(path, str(tmp_path / "o.pt"))
    assert not marker.exists()
    with pytest.raises(TypeError):
        serialization.load_model(pk, trust_pickle="yes")
    with pytest.raises(TypeError):
        serialization.load_model(3)
    assert not marker.exists()


def test_inputs_file_is_weights_only(evil, capsys, tmp_path):
    """--inputs is read with weights_only=True: a pickle there does not run either."""
    pk, _, marker = evil
    path = str(tmp_path / "m.pt")
    safeobs.save(_model(), path)
    rc = cli.main(["audit", path, "--inputs", pk, "-q"])
    assert rc == cli.EXIT_USAGE and not marker.exists()
    assert "Traceback" not in capsys.readouterr().err


def test_trusted_pickle_still_works(tmp_path, capsys):
    m = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 8)))
    with torch.no_grad():
        w = m[0].weight()
        codes = torch.full_like(w.int_repr(), 100)  # every pair sums to 200 > 128: unsafe
        m[0].set_weight_bias(torch._make_per_tensor_quantized_tensor(codes, 0.01, 0), None)
    path = str(tmp_path / "full.pt")
    torch.save(m, path)
    assert cli.main(["audit", path, "-q"]) == cli.EXIT_USAGE
    assert cli.main(["audit", path, "-q", "--trust-pickle"]) == cli.EXIT_UNSAFE
    model, source = serialization.load_model(path, trust_pickle=True)
    assert source == "pickle" and not safeobs.verify(model).ok
    out = str(tmp_path / "safe.pt")
    assert cli.main(["repair", path, "-o", out, "-q", "--trust-pickle"]) == cli.EXIT_OK
    assert cli.main(["audit", out, "-q"]) == cli.EXIT_OK  # safeobs's own output: no flag needed
    capsys.readouterr()


def test_state_file_round_trip_without_trust(tmp_path, capsys):
    m = _model()
    path, out = str(tmp_path / "m.pt"), str(tmp_path / "m_safe.pt")
    safeobs.save(m, path, arch="nowhere_xyz:build")
    assert torch.load(path, weights_only=True)["format"] == serialization.FORMAT  # torch's safe loader reads it
    model, source = serialization.load_model(path)
    assert source == "state"
    want = [(q.name, q.kind, q.groups, q.stride, q.padding) for q in runtimes.layers(m)]
    assert [(q.name, q.kind, q.groups, q.stride, q.padding) for q in runtimes.layers(model)] == want
    for a, b in zip(runtimes.layers(model), runtimes.layers(m)):
        assert torch.equal(a.weight.int_repr(), b.weight.int_repr())
    assert audit.audit(model)["unsafe_layers"] == audit.audit(m)["unsafe_layers"] != []
    assert cli.main(["audit", path, "-q"]) == cli.EXIT_UNSAFE
    assert cli.main(["repair", path, "-o", out, "-q"]) == cli.EXIT_OK
    assert cli.main(["audit", out, "-q"]) == cli.EXIT_OK
    assert torch.load(out, weights_only=True)["arch"] == "nowhere_xyz:build"  # kept, never imported
    # the repaired weights load into the eager model the user builds (arch), which then runs
    fresh, source = serialization.load_model(out, arch=_model)
    assert source == "state_dict" and safeobs.verify(fresh).ok and not safeobs.verify(m).ok
    assert fresh[0].scale == m[0].scale and torch.equal(fresh[0].bias(), m[0].bias())
    # --inputs needs the forward pass: a clear note (audit) / error (repair), no crash
    x = str(tmp_path / "x.pt")
    torch.save(torch.rand(1, 4, 6, 6), x)
    res = audit.audit(model, inputs=(torch.rand(1, 4, 6, 6),))
    assert res["saturation"] is None and "--arch" in res["emulation_note"]
    assert cli.main(["repair", path, "-o", out, "--inputs", x, "-q"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--arch" in err and "Traceback" not in err


def test_plain_state_dict_needs_arch(tmp_path, capsys):
    m = _model()
    path = str(tmp_path / "sd.pt")
    torch.save(m.state_dict(), path)
    assert cli.main(["audit", path, "-q"]) == cli.EXIT_USAGE
    assert "--arch" in capsys.readouterr().err
    model, source = serialization.load_model(path, arch=lambda: _model(seed=1))
    assert source == "state_dict"
    assert torch.equal(model[0].weight().int_repr(), m[0].weight().int_repr())
    with pytest.raises(ValueError, match="does not fit"):
        serialization.load_model(path, arch=lambda: torch.nn.Sequential(nnq.Linear(3, 3)))
    with pytest.raises(TypeError):
        serialization.load_model(path, arch=42)


def test_tampered_state_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "m.pt")
    safeobs.save(_model(), path)
    bundle = torch.load(path, weights_only=True)
    bundle["layers"][0]["kind"] = "conv9d"
    torch.save(bundle, path)
    with pytest.raises(ValueError, match="layer list"):
        serialization.load_model(path)


def test_torchao_save_round_trip_without_trust(tmp_path, capsys):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    import safeobs.torchao as sto

    m = torch.nn.Sequential(torch.nn.Linear(64, 16)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) / 8)
    quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    path, out = str(tmp_path / "ao.pt"), str(tmp_path / "ao_safe.pt")
    sto.save(m, path)
    # a fresh interpreter (torchao not imported, so none of its globals registered): still weights-only
    code = (
        "import sys, torch\nfrom safeobs.tools import runtimes, serialization\n"
        "m, s = serialization.load_model(sys.argv[1])\n"
        "assert s == 'state' and [q.kind for q in runtimes.layers(m)] == ['linear_torchao'], s\n"
    )
    subprocess.run([os.sys.executable, "-c", code, path], check=True, capture_output=True, timeout=600)
    before = list(torch.serialization.get_safe_globals())
    serialization.load_model(path)
    assert torch.serialization.get_safe_globals() == before  # the allow-list is a context, not global state
    assert cli.main(["repair", path, "-o", out, "-q"]) == cli.EXIT_OK
    assert cli.main(["audit", out, "-q"]) == cli.EXIT_OK
    after = serialization.load_model(out)[0].get_submodule("0").weight
    assert type(after).__name__ == "Int8Tensor" and sto.verify(serialization.load_model(out)[0]).ok
    capsys.readouterr()


def test_run_module_private_dir_and_no_outside_unpickling(evil, monkeypatch, tmp_path):
    pk, ts, marker = evil
    seen = {}
    real_mkdtemp = realkernel.tempfile.mkdtemp

    def mkdtemp(*a, **k):
        d = real_mkdtemp(*a, **k)
        seen["dir"] = d
        return d

    def fake_run(cmd, **kw):  # look at the directory as the worker would see it; do not start it
        src = cmd[-2]
        seen["mode"] = stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode)
        seen["files"] = sorted(os.listdir(os.path.dirname(src)))
        with open(src, "rb") as f:
            seen["job"] = __import__("pickle").load(f)
        return subprocess.CompletedProcess(cmd, 3, "", "stopped by the test")

    monkeypatch.setattr(realkernel.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(realkernel.subprocess, "run", fake_run)
    with pytest.raises(ValueError, match="trust_pickle"):
        realrun.run_module(pk, [torch.rand(1, 4).numpy()])
    assert "dir" not in seen and not marker.exists()  # refused before any subprocess or temp dir
    m = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    with pytest.raises(RuntimeError, match="stopped by the test"):
        realrun.run_module(m, [torch.rand(1, 4).numpy()], mode="native")
    assert seen["mode"] == 0o700 and seen["files"] == ["in.pkl", "model.pt"]
    assert seen["job"]["path"] == os.path.join(seen["dir"], "model.pt") and seen["job"]["format"] == "pickle"
    assert not os.path.exists(seen["dir"])  # removed afterwards


def test_worker_loads_only_files_next_to_its_job(tmp_path, evil):
    """The subprocess itself refuses a job whose model path lies outside the job's private directory."""
    import pickle

    pk, _, marker = evil
    src, dst = tmp_path / "job" / "in.pkl", tmp_path / "job" / "out.pkl"
    src.parent.mkdir()
    src.write_bytes(
        pickle.dumps({"kind": "module", "engine": "x86", "path": pk, "inputs": [], "emulate": None, "forced": None})
    )
    from safeobs.tools import _realrun_worker

    with pytest.raises(RuntimeError, match="did not write"):
        _realrun_worker.main(str(src), str(dst))
    assert not marker.exists()
