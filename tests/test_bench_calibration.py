"""Plumbing of benchmarks/bench_calibration.py: the interleaving, the summary, one real (tiny) flow and the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_calibration as bc  # noqa: E402


class FakeClock:
    """A clock that only moves when a fake flow runs: stock costs ``a`` ticks, safeobs ``b`` ticks per call."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def flow(self, name, cost):
        def run():
            self.calls.append(name)
            self.now += cost(len([c for c in self.calls if c == name]))

        return run


def test_interleaving_alternates_and_warmup_is_untimed():
    clk = FakeClock()
    # call k (1-based) of stock costs k, of safeobs 10 * k: the warm-up call (k = 1) must not be in the timings
    stock, safe = clk.flow("stock", lambda k: float(k)), clk.flow("safe", lambda k: 10.0 * k)
    rec = bc.interleaved(stock, safe, rounds=4, warmup=1, clock=clk)
    assert clk.calls == ["stock", "safe"] + ["stock", "safe", "safe", "stock"] * 2
    assert rec["stock_s"] == [2.0, 3.0, 4.0, 5.0] and rec["safeobs_s"] == [20.0, 30.0, 40.0, 50.0]
    assert rec["ratios"] == [10.0] * 4


def test_a_flow_may_report_its_own_seconds():
    clk = FakeClock()
    rec = bc.interleaved(lambda: 2.0, lambda: 9.0, rounds=3, warmup=0, clock=clk)
    assert rec["ratios"] == [4.5] * 3


def test_summary_median_range_and_target():
    s = bc.summary({"stock_s": [1, 2, 4], "safeobs_s": [3, 12, 8], "ratios": [3.0, 6.0, 2.0]})
    assert (s["stock"], s["safeobs"], s["ratio"], s["ratio_min"], s["ratio_max"]) == (2, 8, 3.0, 2.0, 6.0)
    assert s["met"] is True
    assert bc.summary({"stock_s": [1], "safeobs_s": [6], "ratios": [6.0]})["met"] is False


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(rounds=2, warmup=-1)])
def test_bad_counts_raise(bad):
    with pytest.raises(ValueError):
        bc.interleaved(lambda: None, lambda: None, **bad)


def test_torchao_smoke_flow_and_report(tmp_path):
    pytest.importorskip("safeobs.torchao", reason="torchao is not installed")
    args = argparse.Namespace(smoke=True, rounds=2, warmup=1)
    recs = bc.flow_torchao(args)
    (rec,) = recs
    assert len(rec["stock_s"]) == len(rec["safeobs_s"]) == len(rec["quantize_only_s"]) == 2
    assert all(t > 0 for t in rec["stock_s"] + rec["safeobs_s"])
    assert all(q < s for q, s in zip(rec["quantize_only_s"], rec["stock_s"]))  # quantize_ is part of the stock flow
    res = {
        "host": bc.host_info(),
        "load_start": (0.5, 0.5, 0.5),
        "rounds": 2,
        "requested": ["torchao", "onnx"],
        "command": "test",
        "date": "today",
        "flows": [{"flow": "torchao", "records": recs, "threads": bc.threads_info()}],
        "errors": {"onnx": "worker exited 1"},
    }
    bc.render(res, tmp_path)
    md = (tmp_path / "calibration.md").read_text()
    s = bc.summary(rec)
    assert f"**{s['ratio']:.2f}x**" in md and ("**met**" in md) == s["met"]
    assert "onnx | — | not measured: worker exited 1" in md and res["host"]["cpu"] in md
    assert (tmp_path / "calibration.png").stat().st_size > 1000


def test_merge_keeps_every_run_and_drops_errors_another_run_measured():
    def run(cmd, flows, errors):
        recs = lambda f: [{"flow": f, "model": "m", "ratios": [1.0]}]  # noqa: E731
        return {
            "command": cmd,
            "load_start": [1.0, 1.0, 1.0],
            "requested": flows + list(errors),
            "flows": [{"flow": f, "records": recs(f)} for f in flows],
            "errors": errors,
        }

    res = bc.merge([run("a", ["pt2e", "onnx"], {"openvino": "killed"}), run("b", ["openvino"], {"torchao": "x"})])
    assert [f["flow"] for f in res["flows"]] == ["pt2e", "onnx", "openvino"]
    assert [f["run"] for f in res["flows"]] == ["a", "a", "b"] and res["command"] == "a + b"
    assert res["errors"] == {"torchao": "x"} and set(res["requested"]) == {"pt2e", "onnx", "openvino", "torchao"}
    again = bc.merge([res, run("c", ["torchao"], {})])  # a merged file merged again keeps each flow's own run
    assert [f["run"] for f in again["flows"]] == ["a", "a", "b", "c"] and again["errors"] == {}
    with pytest.raises(ValueError):
        bc.merge([])
