"""Issue 19: the activation-compensating PT2E rounding (quantized-input statistics, ``compensate_activations``)."""

from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import torch

pt2e = pytest.importorskip("safeobs.pt2e", reason="torchao is not installed")

from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

from safeobs.core.solver import quantize, safe_qparams  # noqa: E402
from safeobs.pt2e import rounding  # noqa: E402


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


def _prepared_and_converted(m, cal):
    exported = torch.export.export(copy.deepcopy(m), cal[0]).module()
    prepared = prepare_pt2e(
        exported, pt2e.X86InductorQuantizer().set_global(pt2e.get_x86_inductor_quantization_config())
    )
    pt2e._tell_groups(prepared)
    with torch.no_grad():
        for b in cal:
            prepared(*b)
    float_model = copy.deepcopy(prepared)
    return float_model, convert_pt2e(prepared)


def _inputs(gm, batch):
    """{conv/linear node name: its input tensor} of one run of ``gm``, by torch.fx.Interpreter (no recorder)."""
    names = {
        n.name for n in gm.graph.nodes if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    }
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name in names:
                seen[n.name] = self.env[n.args[0]].clone()
            return super().run_node(n)

    with torch.no_grad():
        Spy(gm).run(*batch)
    return seen


def _rows(x, st):
    """(G, S, K) receptive fields with F.unfold (conv) or the rows (linear): every position."""
    if st.op == "linear":
        return x.reshape(1, -1, x.shape[-1]).double()
    kh, kw = st.weight.shape[2:]
    u = torch.nn.functional.unfold(x.double(), (kh, kw), padding=(kh // 2, kw // 2))  # (N, C*kh*kw, L)
    g = st.groups
    n, ck, L = u.shape
    u = u.reshape(n, g, ck // g, L).permute(1, 0, 3, 2).reshape(g, n * L, ck // g)
    return u


def _direct(float_model, converted, cal, stats, local):
    """The statistics by numpy: x from the float graph, x^ from the converted graph run by hand (or, local, x
    fake-quantized with the converted graph's input qparams)."""
    out = {}
    nodes = {n.name: n for n in converted.graph.nodes}
    for batch in cal:
        xs = _inputs(float_model, batch)
        xhs = _inputs(converted, batch)
        for name, st in stats.items():
            x = xs[name]
            if local:
                d = nodes[name].args[0]
                scale, zp, qmin, qmax = d.args[1:5]
                xh = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), int(qmin), int(qmax))
            else:
                xh = xhs[name]
            c, ch = _rows(x, st).numpy(), _rows(xh, st).numpy()
            acc = out.setdefault(name, dict(xx=0, cross=0, ff=0, xsum=0, fsum=0, n=0, rows=[]))
            acc["rows"].append(ch)
            acc["xx"] = acc["xx"] + np.einsum("gsi,gsj->gij", ch, ch)
            acc["cross"] = acc["cross"] + np.einsum("gsi,gsj->gij", c, ch)
            acc["ff"] = acc["ff"] + np.einsum("gsi,gsj->gij", c, c)
            acc["xsum"] = acc["xsum"] + ch.sum(1)
            acc["fsum"] = acc["fsum"] + c.sum(1)
            acc["n"] += c.shape[1]
    return out


@pytest.mark.parametrize("local", [True, False])
def test_quantized_input_statistics_equal_a_direct_computation(local):
    m, cal = _cnn()
    float_model, converted = _prepared_and_converted(m, cal)
    stats = rounding.calibrate_quantized_pt2e(float_model, converted, cal, local=local)
    assert set(stats) == {"conv2d", "conv2d_1", "linear"}
    direct = _direct(float_model, converted, cal, stats, local)
    for name, st in stats.items():
        d = direct[name]
        assert st.n == d["n"]
        for key in ("xx", "cross", "ff", "xsum", "fsum"):
            np.testing.assert_allclose(getattr(st, key), d[key], rtol=1e-5, atol=1e-4, err_msg=f"{name} {key}")
        # the quantized input differs from the float one (else the test shows nothing)
        assert not np.allclose(st.xx, st.ff)
    # the recorders are gone: the graphs run as before
    assert not any("_safeobs_recorder" in n.name for n in converted.graph.nodes)


def test_ridge_target_tends_to_the_least_squares_one():
    m, cal = _cnn()
    float_model, converted = _prepared_and_converted(m, cal)
    st = rounding.calibrate_quantized_pt2e(float_model, converted, cal, local=False)["conv2d"]
    w = st.weight.double().numpy().reshape(st.weight.shape[0], -1)
    wstar, mm, cw = rounding.compensation_target(st, centered=False, damp=1e-9)
    c = st.cross[0] / st.n
    np.testing.assert_allclose(wstar @ mm[0], w @ c, rtol=1e-4, atol=1e-6 * np.abs(w @ c).max())
    np.testing.assert_allclose(cw, w @ c)
    assert np.array_equal(rounding.compensation_target(st, centered=True)[0], w)  # default: W* = W


def test_objective_is_the_output_error_and_never_worse_than_rtn():
    """``error`` = E||W xc - W^ x^c||^2 per channel from the raw rows, and <= RTN's (tightest safe scale)."""
    m, cal = _cnn(3)
    float_model, converted = _prepared_and_converted(m, cal)
    stats = rounding.calibrate_quantized_pt2e(float_model, converted, cal, local=True)
    direct = _direct(float_model, converted, cal, stats, True)
    results = rounding.apply_pt2e(converted, stats)
    assert pt2e.verify(converted, "x86").ok
    for name, r in results.items():
        st, d = stats[name], direct[name]
        n, oc = d["n"], st.weight.shape[0]
        w = st.weight.double().numpy().reshape(st.groups, oc // st.groups, -1)
        mf, mh = d["fsum"] / n, d["xsum"] / n
        ff = d["ff"] / n - np.einsum("gi,gj->gij", mf, mf)
        cc = d["cross"] / n - np.einsum("gi,gj->gij", mf, mh)
        hh = d["xx"] / n - np.einsum("gi,gj->gij", mh, mh)

        def objective(codes, scale):
            v = (scale.astype(np.float64)[:, None] * codes.reshape(oc, -1)).reshape(w.shape)
            return (((w @ ff) * w).sum(-1) - 2 * ((w @ cc) * v).sum(-1) + ((v @ hh) * v).sum(-1)).reshape(oc)

        scale0 = safe_qparams(st.weight, op=st.op, groups=st.groups)[0].numpy()
        rtn = quantize(st.weight.reshape(oc, -1).numpy(), scale0[:, None])
        # a difference of terms of size W E[x x^T] W^T, each summed in float32 by the statistics: compare at that scale
        tol = 1e-5 * ((w @ ff) * w).sum(-1).reshape(oc)
        assert np.all(np.abs(r.rtn_error - objective(rtn, scale0)) <= tol)
        assert np.all(np.abs(r.error - objective(r.codes, r.scale)) <= tol)
        assert np.all(r.error <= r.rtn_error)
        # the bias absorbs the mean output error W E[x] - W^ E[x^]
        v = (r.scale.astype(np.float64)[:, None] * r.codes.reshape(oc, -1)).reshape(w.shape)
        want = (w @ mf[:, :, None] - v @ mh[:, :, None]).reshape(oc)
        np.testing.assert_allclose(r.bias_delta, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert any(np.any(r.error < r.rtn_error) for r in results.values())


def test_quantize_pt2e_compensates_by_default_deterministically_and_takes_an_iterator():
    m, cal = _cnn()
    a = pt2e.quantize_pt2e(m, cal[0], cal)
    b = pt2e.quantize_pt2e(m, cal[0], iter(cal))  # a one-shot iterator runs twice
    off = pt2e.quantize_pt2e(m, cal[0], cal, compensate_activations=False)
    assert all(r.extra.get("compensated") for r in a.meta["safeobs_rounding"].values())
    assert not any(r.extra.get("compensated") for r in off.meta["safeobs_rounding"].values())
    with torch.no_grad():
        assert torch.equal(a(*cal[1]), b(*cal[1]))
    for gm in (a, b, off):
        assert pt2e.verify(gm, "x86").ok
    biases = [
        operator.attrgetter(n.args[2].target)(a)
        for n in a.graph.nodes
        if n.target is torch.ops.aten.conv2d.default and len(n.args) > 2
    ]
    assert biases and all(torch.isfinite(x).all() for x in biases)


def test_dynamic_activations_keep_the_float_statistics():
    m, cal = _cnn(1)
    gm = pt2e.quantize_pt2e(m, cal[0], cal, is_dynamic=True)
    results = gm.meta["safeobs_rounding"]
    assert results and not any(r.extra.get("compensated") for r in results.values()) and pt2e.verify(gm).ok


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=hs.integers(0, 2**16), gain=hs.floats(0.05, 20.0), shift=hs.floats(-1.0, 1.0))
def test_compensated_codes_safe_whatever_the_data(seed, gain, shift):
    m, _ = _cnn(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cal = [((torch.rand(2, 3, 8, 8, generator=g) + shift) * gain,) for _ in range(2)]
    gm = pt2e.quantize_pt2e(m, cal[0], cal, compensate_activations=True)
    assert pt2e.verify(gm, "x86").ok
    for r in gm.meta["safeobs_rounding"].values():
        assert np.all(r.error <= r.rtn_error) and np.all(np.isfinite(r.bias_delta))


def test_default_statistics_round_on_the_quantized_inputs_never_worse_than_rtn():
    """``cross=False`` (quantize_pt2e's default): error = E||(W - W^) x^c||^2 from the raw rows (their second
    moment shrunk by scikit-learn's Ledoit-Wolf), <= RTN's."""
    from sklearn.covariance import ledoit_wolf

    m, cal = _cnn(4)
    float_model, converted = _prepared_and_converted(m, cal)
    stats = rounding.calibrate_quantized_pt2e(float_model, converted, cal, local=True, cross=False)
    assert all(st.cross is None and st.ff is None for st in stats.values())
    direct = _direct(float_model, converted, cal, stats, True)
    results = rounding.apply_pt2e(converted, stats)
    assert pt2e.verify(converted, "x86").ok and len(results) == 3
    for name, r in results.items():
        st, d = stats[name], direct[name]
        np.testing.assert_allclose(st.xx, d["xx"], rtol=1e-5, atol=1e-4)
        n, oc = d["n"], st.weight.shape[0]
        w = st.weight.double().numpy().reshape(st.groups, oc // st.groups, -1)
        mh = d["xsum"] / n
        # the rounding's covariance of x^ is shrunk by its Ledoit-Wolf intensity: here scikit-learn's, from the rows
        rows = np.concatenate(d["rows"], axis=1)
        hh = np.stack([ledoit_wolf(rows[g])[0] for g in range(st.groups)])
        shrunk = hh + np.einsum("gi,gj->gij", mh, mh)

        def objective(codes, scale, h=hh):
            e = w - (scale.astype(np.float64)[:, None] * codes.reshape(oc, -1)).reshape(w.shape)
            return ((e @ h) * e).sum(-1).reshape(oc)

        scale0 = safe_qparams(st.weight, op=st.op, groups=st.groups)[0].numpy()
        rtn = quantize(st.weight.reshape(oc, -1).numpy(), scale0[:, None])
        # centering cancels (the linear sees 6 rows): compare at the scale of the uncentered objective
        for got, codes, scale in ((r.rtn_error, rtn, scale0), (r.error, r.codes, r.scale)):
            tol = 1e-4 * objective(codes, scale, shrunk)
            assert np.all(np.abs(got - objective(codes, scale)) <= tol)
        assert np.all(r.error <= r.rtn_error) and r.extra["exact_objective"] is False
    with pytest.raises(ValueError, match="cross"):
        rounding.apply_pt2e(converted, stats, target_damp=0.1)
