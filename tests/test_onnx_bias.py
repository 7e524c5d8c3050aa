"""ONNX Runtime ``quantize_dynamic`` with calibration data: the float bias absorbs each MatMul's mean output error.

The checks use ORT's own outputs: the quantized model is run by ORT (``x64quantprecision=1``, the exact integer
path) on every calibration feed, one run per feed as in the calibration, and its mean error against the float model
is measured there, not recomputed the way the correction computes it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'safeobs[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'safeobs[onnx]')")

from safeobs import onnx as so  # noqa: E402

warnings.filterwarnings("ignore", module="onnxruntime")


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _session(path, exact=True):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    if exact:
        o.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _linear(d, k, n, rank, bias=True, seed=0):
    import torch

    torch.manual_seed(seed)
    m = torch.nn.Linear(k, n, bias=bias).eval()
    with torch.no_grad():
        m.weight.mul_(torch.linspace(0.2, 3.0, k))  # uneven input columns, as in transformers
        if bias:
            m.bias.uniform_(-1, 1)
    shape = (2, 3, k) if rank == 3 else (2, k)
    axes = {0: "b", 1: "t"} if rank == 3 else {0: "b"}
    torch.onnx.export(
        m, (torch.randn(*shape),), str(d / "m.onnx"), dynamo=False, input_names=["x"], dynamic_axes={"x": axes}
    )
    return d / "m.onnx"


def _mean_error(q_path, f_path, feeds):
    """Per output channel: mean and mean square of (quantized - float) over every row of every feed (ORT runs)."""
    sq, sf = _session(q_path), _session(f_path, exact=False)
    outs = [sq.run(None, f)[0].astype(np.float64) - sf.run(None, f)[0].astype(np.float64) for f in feeds]
    d = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])
    return d.mean(0), (d**2).mean(0)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 40)),
    gain=st.floats(1e-3, 1e3),
    shift=st.floats(-2.0, 2.0),
)
def test_dynamic_quantize_is_ort_dynamicquantizelinear(shape, gain, shift):
    """``so.dynamic_quantize`` gives, bit for bit, ORT's DynamicQuantizeLinear dequantized (what the integer
    MatMul multiplies), whatever the range, sign and size of the tensor."""
    x = ((np.random.default_rng(shape[0] * 41 + shape[1]).standard_normal(shape) + shift) * gain).astype(np.float32)
    h = onnx.helper
    g = h.make_graph(
        [h.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
        "dql",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [
            h.make_tensor_value_info("y", onnx.TensorProto.UINT8, list(shape)),
            h.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []),
            h.make_tensor_value_info("z", onnx.TensorProto.UINT8, []),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    y, s, z = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ref = ((y.astype(np.float32) - np.float32(z)) * np.float32(s)).astype(np.float32)
    np.testing.assert_array_equal(so.dynamic_quantize(x), ref)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    gain=st.floats(0.05, 20.0),
    shift=st.floats(-1.5, 1.5),
    rank=st.sampled_from([2, 3]),
    per_channel=st.booleans(),
)
def test_quantize_dynamic_bias_absorbs_the_mean_error(tmp_path_factory, seed, gain, shift, rank, per_channel):
    """With calibration data, the written float bias makes ORT's quantized output unbiased on that data, channel by
    channel (its mean error vs the float model is 0 up to float32 rounding), so the mean square error there never
    grows; the codes, scales and safety are those without the correction."""
    d = tmp_path_factory.mktemp("bc")
    fp = _linear(d, 24, 12, rank, seed=seed)
    rng = np.random.default_rng(seed)
    shape = (3, 5, 24) if rank == 3 else (6, 24)
    feeds = [{"x": ((rng.standard_normal(shape) + shift) * gain).astype(np.float32)} for _ in range(3)]
    kw = dict(per_channel=per_channel)
    on = so.quantize_dynamic(str(fp), str(d / "on.onnx"), calibration_data_reader=_Reader(feeds), **kw)
    off = so.quantize_dynamic(
        str(fp), str(d / "off.onnx"), calibration_data_reader=_Reader(feeds), bias_correction=False, **kw
    )
    assert on.ok and off.ok and so.verify(d / "on.onnx", "ort").ok
    assert len(on.bias_corrected) == 1 and not off.bias_corrected
    a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "on.onnx")).graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "off.onnx")).graph.initializer}
    (bias,) = on.bias_corrected.values()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k != bias)  # only the bias moves

    m_on, ms_on = _mean_error(d / "on.onnx", fp, feeds)
    m_off, ms_off = _mean_error(d / "off.onnx", fp, feeds)
    y = np.concatenate([_session(fp, exact=False).run(None, f)[0].reshape(-1, 12) for f in feeds])
    tol = 2e-6 * (np.abs(y).max() + np.abs(b[bias]).max())  # float32 rounding of the outputs and of the bias
    np.testing.assert_allclose(m_on, 0, atol=tol)
    assert np.all(ms_on <= ms_off + 2 * tol * np.sqrt(ms_off) + tol**2)
    np.testing.assert_allclose(ms_on, ms_off - m_off**2, rtol=1e-4, atol=4 * tol * np.sqrt(ms_off.max()) + tol**2)


def test_bias_correction_moves_the_bias_and_skips_matmuls_without_one(tmp_path):
    """Without the correction the calibration mean error is far from 0 (the test above can fail); a MatMul with
    no float bias after it is left alone; deterministic."""
    fp = _linear(tmp_path, 32, 8, 3, seed=1)
    rng = np.random.default_rng(1)
    feeds = [{"x": (rng.standard_normal((2, 7, 32)) + 0.7).astype(np.float32)} for _ in range(4)]
    off = so.quantize_dynamic(
        str(fp),
        str(tmp_path / "off.onnx"),
        per_channel=True,
        calibration_data_reader=_Reader(feeds),
        bias_correction=False,
    )
    on = so.quantize_dynamic(
        str(fp), str(tmp_path / "on.onnx"), per_channel=True, calibration_data_reader=_Reader(feeds)
    )
    so.quantize_dynamic(str(fp), str(tmp_path / "again.onnx"), per_channel=True, calibration_data_reader=_Reader(feeds))
    m_off, ms_off = _mean_error(tmp_path / "off.onnx", fp, feeds)
    m_on, _ = _mean_error(tmp_path / "on.onnx", fp, feeds)
    assert off.ok and on.ok and on.bias_corrected and np.abs(m_off).max() > 100 * np.abs(m_on).max()
    assert np.abs(m_off).max() > 0.05 * np.sqrt(ms_off.max())
    a = onnx.load(str(tmp_path / "on.onnx")).graph.initializer
    b = onnx.load(str(tmp_path / "again.onnx")).graph.initializer
    assert [onnx.numpy_helper.to_array(i).tobytes() for i in a] == [onnx.numpy_helper.to_array(i).tobytes() for i in b]

    nb = tmp_path / "nb"
    nb.mkdir()
    fp = _linear(nb, 32, 8, 2, bias=False)
    rep = so.quantize_dynamic(
        str(fp), str(nb / "q.onnx"), per_channel=True, calibration_data_reader=_Reader([{"x": feeds[0]["x"][0]}])
    )
    assert rep.ok and not rep.bias_corrected and len(rep.rounded) == 1
