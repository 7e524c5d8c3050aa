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
