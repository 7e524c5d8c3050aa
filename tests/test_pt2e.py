"""Issue 4, PT2E: the X86InductorQuantizer config through prepare_pt2e / convert_pt2e / torch.compile."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pt2e = pytest.importorskip("safeobs.pt2e", reason="torchao is not installed")

from torchao.quantization.pt2e import ObserverBase  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq  # noqa: E402

from safeobs.kernels import realkernel  # noqa: E402
from safeobs.torch_ao.observers import _SafeMixin  # noqa: E402


def toy():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    ).eval()
    with torch.no_grad():
        for p in m.parameters():  # large same-sign weights: stock observers pair unsafe codes
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.3)
    return m, torch.rand(4, 3, 8, 8, generator=g)


def quantize(model, x, config):
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    prepared(x)
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def converted():
    model, x = toy()
    return (
        model,
        x,
        {
            "torch": quantize(model, x, xiq.get_default_x86_inductor_quantization_config()),
            "safeobs": quantize(model, x, pt2e.get_x86_inductor_quantization_config()),
        },
    )


@pytest.mark.parametrize("is_qat", [False, True])
def test_config_has_safe_weights_and_full_range_activations(is_qat):
    config = pt2e.get_x86_inductor_quantization_config(is_qat=is_qat)
    assert config.input_activation.quant_max == 255 and config.weight.qscheme == torch.per_channel_symmetric
    ctr = config.weight.observer_or_fake_quant_ctr()
    observer = ctr.activation_post_process if is_qat else ctr
    assert isinstance(observer, _SafeMixin) and isinstance(observer, ObserverBase) and observer.layout == "x86"
    assert isinstance(pickle.loads(pickle.dumps(observer)), type(observer))


def test_layout_must_cover_onednn():
    with pytest.raises(ValueError, match="oneDNN"):
        pt2e.get_x86_inductor_quantization_config(layout="fbgemm")


@pytest.mark.parametrize("layout", ["fbgemm", "onednn", "x86"])
def test_convert_pt2e_weights_are_safe_where_torch_are_not(converted, layout):
    _, _, models = converted
    assert len(list(pt2e.quantized_weights(models["safeobs"]))) == 3
    assert pt2e.verify(models["safeobs"], layout).ok
    assert not pt2e.verify(models["torch"], layout).ok


@pytest.mark.slow
def test_torch_compile_runs_int8_onednn_kernels_without_saturation(converted):
    """Inductor (freezing) lowers to oneDNN int8 qconv/qlinear; on a CPU without VNNI those pair weights
    in int16 lanes.  The safe model matches its float reference graph; torch's saturates."""
    import torch._inductor.config as inductor_config

    _, x, models = converted
    errors = {}
    with torch.no_grad(), inductor_config.patch(freezing=True):
        for name, model in models.items():
            torch._dynamo.reset()
            reference = model(x)
            compiled = torch.compile(model)(x)
            errors[name] = float((compiled - reference).abs().max() / reference.abs().max())
    assert errors["safeobs"] < 1e-3, errors
    if realkernel.host_isa() != "vnni":  # VNNI accumulates exactly: nothing to show there
        assert errors["torch"] > 10 * max(errors["safeobs"], 1e-4), errors


# -- issue 19: safeobs.quantize_pt2e, one call --------------------------------------------------------


def _cnn(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()
    with torch.no_grad():
        for p in m.parameters():  # large same-sign weights: RTN at torch's scales would pair unsafe codes
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.3)
    cal = [(torch.rand(2, 3, 8, 8, generator=g),) for _ in range(3)]
    return m, cal


def _codes(gm):
    return {name: codes.copy() for name, codes, _, _ in pt2e.quantized_weights(gm)}


@pytest.fixture(scope="module")
def one_call():
    import safeobs

    m, cal = _cnn()
    return m, cal, safeobs.quantize_pt2e(m, cal[0], cal)


def test_star_import_needs_no_torchao():
    import subprocess
    import sys

    code = "import sys; sys.modules['torchao'] = None\nfrom safeobs import *\nprint(quantize_fx.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "quantize_fx", out.stderr[-500:]


def test_quantize_pt2e_is_top_level_and_data_aware(one_call):
    import safeobs

    assert safeobs.quantize_pt2e is pt2e.quantize_pt2e and "quantize_pt2e" in dir(safeobs)
    _, _, gm = one_call
    results = gm.meta["safeobs_rounding"]
    assert len(results) == 3 and len(_codes(gm)) == 3
    assert pt2e.verify(gm, "x86").ok and pt2e.verify(gm, "onednn").ok and pt2e.verify(gm, "fbgemm").ok
    # never worse than RTN at the tightest safe scale on the calibration objective, per channel, by construction
    import numpy as np

    assert all(np.all(r.error <= r.rtn_error) for r in results.values())
    assert any(np.any(r.error < r.rtn_error) for r in results.values())


def test_quantize_pt2e_deterministic_and_accepts_exported(one_call):
    import numpy as np

    m, cal, gm = one_call
    again = pt2e.quantize_pt2e(torch.export.export(copy.deepcopy(m), cal[0]).module(), cal[0], cal)
    a, b = _codes(gm), _codes(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(gm(*cal[1]), again(*cal[1]))


def test_quantize_pt2e_without_calibration_is_rtn_at_safe_scales():
    import numpy as np

    m, cal = _cnn()
    gm = pt2e.quantize_pt2e(m, cal[0])
    assert gm.meta["safeobs_rounding"] == {} and pt2e.verify(gm).ok
    manual = quantize(m, cal[0][0], pt2e.get_x86_inductor_quantization_config())
    a, b = _codes(gm), _codes(manual)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw", [{"is_dynamic": True}, {"is_qat": True}])
def test_quantize_pt2e_dynamic_and_qat(kw):
    import numpy as np

    m, cal = _cnn(1)
    gm = pt2e.quantize_pt2e(m, cal[0], cal, **kw)
    results = gm.meta["safeobs_rounding"]
    assert results and pt2e.verify(gm).ok
    assert all(np.all(r.error <= r.rtn_error) for r in results.values())
    with torch.no_grad():
        assert torch.isfinite(gm(*cal[0])).all()


def test_quantize_pt2e_rejects_bad_arguments():
    m, cal = _cnn()
    with pytest.raises(ValueError, match="backend"):
        pt2e.quantize_pt2e(m, cal[0], cal, backend="arm")
    with pytest.raises(TypeError, match="iterable"):
        pt2e.quantize_pt2e(m, cal[0], cal[0][0])


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), gain=st.floats(0.05, 20.0), shift=st.floats(-1.0, 1.0))
def test_quantize_pt2e_codes_safe_whatever_the_data(seed, gain, shift):
    import numpy as np

    m, _ = _cnn(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cal = [((torch.rand(2, 3, 8, 8, generator=g) + shift) * gain,) for _ in range(2)]
    gm = pt2e.quantize_pt2e(m, cal[0], cal)
    assert pt2e.verify(gm, "x86").ok
    assert all(np.all(r.error <= r.rtn_error) for r in gm.meta["safeobs_rounding"].values())


@pytest.mark.slow
def test_quantize_pt2e_compiles_with_inductor_freezing(one_call):
    import torch._inductor.config as inductor_config

    _, cal, gm = one_call
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch._dynamo.reset()
        reference = gm(*cal[1])
        compiled = torch.compile(gm)(*cal[1])
    assert compiled.shape == reference.shape and torch.isfinite(compiled).all()
    assert float((compiled - reference).abs().max() / reference.abs().max()) < 1e-2
