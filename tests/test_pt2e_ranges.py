"""Output-aware u8 activation ranges of the PT2E flow (``quantize_pt2e(activation_ranges=...)``)."""

from __future__ import annotations

import copy

import pytest
import torch

pt2e = pytest.importorskip("safeobs.pt2e", reason="torchao is not installed")

from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

import safeobs  # noqa: E402
from safeobs.pt2e import ranges  # noqa: E402


def _net(seed=0):
    """conv -> ReLU -> grouped conv -> (signed) -> linear, with a few large-input channels (heavy tails)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()
    x = torch.randn(24, 3, 8, 8, generator=g)
    x[:, 0] *= 6  # a wide channel
    x[::7, 1, 2, 2] = 40.0  # rare outliers
    cal = [(x[i : i + 4],) for i in range(0, 24, 4)]
    return m, cal


def _prepared(m, cal):
    exported = torch.export.export(copy.deepcopy(m), cal[0]).module()
    return prepare_pt2e(exported, pt2e.X86InductorQuantizer().set_global(pt2e.get_x86_inductor_quantization_config()))


def _observer_inputs(prepared, cal):
    """{observer target: its input, every position, channels last}, by torch.fx.Interpreter (no hook)."""
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_module" and n.target in targets:
                x = self.env[n.args[0]]
                axis = 1 if x.dim() == 4 else -1
                seen.setdefault(n.target, []).append(x.movedim(axis, -1).reshape(-1, x.shape[axis]).clone())
            return out

    targets = {n.target for n in prepared.graph.nodes if n.op == "call_module"}
    with torch.no_grad():
        for b in cal:
            Spy(prepared).run(*b)
    return {k: torch.cat(v) for k, v in seen.items()}


def test_channel_weights_fold_taps_and_groups():
    m, cal = _net()
    prepared = _prepared(m, cal)
    by_input = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and ranges._is_act_observer(prepared.get_submodule(node.target)):
            d, axis = ranges.channel_weights(prepared, node)
            if d is not None:
                by_input[len(d), axis] = d
    w1, w2, w3 = m[0].weight.detach(), m[2].weight.detach(), m[4].weight.detach()
    # first conv: channel c is read by every output channel at every tap
    assert torch.allclose(by_input[3, 1], (w1**2).sum((0, 2, 3)).double(), rtol=1e-6)
    # grouped conv (2 groups of 4): channel c is read only by its group's 4 output channels
    ref = torch.stack([(w2[(c // 4) * 4 : (c // 4) * 4 + 4, c % 4] ** 2).sum() for c in range(8)])
    assert torch.allclose(by_input[8, 1], ref.double(), rtol=1e-6)
    # linear: column norms
    assert torch.allclose(by_input[512, -1], (w3**2).sum(0).double(), rtol=1e-6)


def test_chosen_ranges_no_worse_than_the_observer_and_in_the_converted_graph():
    m, cal = _net()
    prepared = _prepared(m, cal)
    r = ranges.ActivationRanges(prepared, max_positions=10**9, max_values=10**12)  # every position: the whole input
    nodes = {n.target: n for n in prepared.graph.nodes if n.op == "call_module"}
    with r, torch.no_grad():
        for b in cal:
            prepared(*b)
    full = _observer_inputs(prepared, cal)
    choices = r.apply()
    assert len(choices) == 3  # the three conv/linear inputs
    moved = 0
    for target, ch in choices.items():
        d, _axis = ranges.channel_weights(prepared, nodes[target])
        x = full[target]
        assert ch.positions == len(x)
        # J recomputed independently: weighted per-channel variance of the fake-quant error
        q = lambda s, z: ((torch.round(x * (1.0 / s)) + z).clamp(0, 255) - z) * s  # noqa: E731
        for s, z, j in [(ch.scale, ch.zero_point, ch.objective), (ch.observer_scale, ch.observer_zero_point, None)]:
            e = (x - q(s, z)).double()
            ref = float(((d / d.sum()) * e.var(0, unbiased=False)).sum())
            assert j is None or abs(ref - j) <= 1e-9 + 1e-6 * ref
        assert ch.objective <= ch.observer_objective
        moved += ch.objective < 0.99 * ch.observer_objective
    assert moved >= 1  # the heavy-tailed inputs: the observer's choice is not the weighted optimum
    gm = convert_pt2e(prepared)
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    in_graph = {(round(float(n.args[1]), 9), int(n.args[2])) for n in gm.graph.nodes if n.target is q}
    for ch in choices.values():
        assert (round(ch.scale, 9), ch.zero_point) in in_graph


def test_quantize_pt2e_ranges_option_deterministic_and_validated():
    m, cal = _net(1)
    a = safeobs.quantize_pt2e(copy.deepcopy(m), cal[0], cal, activation_ranges="output")
    b = safeobs.quantize_pt2e(copy.deepcopy(m), cal[0], cal, activation_ranges="output")
    o = safeobs.quantize_pt2e(copy.deepcopy(m), cal[0], cal, activation_ranges="observer")
    dflt = safeobs.quantize_pt2e(copy.deepcopy(m), cal[0], cal)  # the default is "output"
    ca, cb = a.meta["safeobs_activation_ranges"], b.meta["safeobs_activation_ranges"]
    assert ca and ca.keys() == cb.keys() == dflt.meta["safeobs_activation_ranges"].keys()
    assert all((ca[k].scale, ca[k].zero_point) == (cb[k].scale, cb[k].zero_point) for k in ca)
    assert o.meta["safeobs_activation_ranges"] == {}
    # "observer" keeps torchao's qparams: they are the observer_* of the "output" choices
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    in_o = {(round(float(n.args[1]), 9), int(n.args[2])) for n in o.graph.nodes if n.target is q}
    assert all((round(c.observer_scale, 9), c.observer_zero_point) in in_o for c in ca.values())
    assert pt2e.verify(a).ok
    x = cal[0][0]
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="activation_ranges"):
        safeobs.quantize_pt2e(copy.deepcopy(m), cal[0], cal, activation_ranges="mse")


@pytest.mark.parametrize("layout", ["conv", "linear"])
def test_reservoir_keeps_the_smallest_keys_of_all_positions(layout):
    """Streaming bottom-k: the kept positions are exactly those with the ``cap`` smallest keys over every batch (a
    uniform sample without replacement of all positions), gathered with all their channels, at a fixed size."""
    g = torch.Generator().manual_seed(3)
    if layout == "conv":  # (B, C, H, W), positions (b, h, w)
        batches = [torch.randn(2, 4, 5, 3, generator=g) + 10 * i for i in range(7)]
        flat = [b.movedim(1, -1).reshape(-1, 4) for b in batches]
    else:  # (..., C), positions are rows
        batches = [torch.randn(3, 11, 4, generator=g) + 10 * i for i in range(7)]
        flat = [b.reshape(-1, 4) for b in batches]
    cap = 40
    r = ranges._Reservoir(torch.ones(4), 1 if layout == "conv" else -1, cap, torch.Generator().manual_seed(9))
    for b in batches:
        r.add(b)
    gen = torch.Generator().manual_seed(9)  # the same key stream, drawn for all positions at once
    keys = torch.cat([torch.rand(len(f), generator=gen) for f in flat])
    want = torch.cat(flat)[torch.topk(keys, cap, largest=False).indices]
    assert r.rows.shape == (cap, 4)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(r.rows) == key(want)
    assert len({int(v // 10 + 0.5) for v in r.rows[:, 0].tolist()}) > 3  # later batches are represented
