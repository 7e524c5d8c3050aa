"""`pip install` is enough for `safeobs demo`: the demo's weights ship inside the package (issue 9)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from safeobs import cli
from safeobs.data import models

DATA = Path(models.__file__).resolve().parent / "_data"


def test_shipped_demo_weights_are_the_wheels_tensors_bit_for_bit():
    meta = json.loads((DATA / "mobilenet_v2_demo.json").read_text())
    src = models.mobilenet_weights_path()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == meta["source_sha256"]
    full = torch.load(src, map_location="cpu", weights_only=True)
    with np.load(DATA / "mobilenet_v2_demo.npz") as z:
        assert sorted(z.files) == sorted(meta["keys"]) and sum(z[k].size for k in z.files) == meta["values"]
        for k in z.files:
            assert np.array_equal(z[k], full[k].numpy()), k
    demo_model, real = models.mobilenet_v2_demo(), models.mobilenet_v2()
    for name in ("features.0", "features.1", "features.2.conv.0", "features.2.conv.1"):
        a, b = demo_model.get_submodule(name).state_dict(), real.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked")), name


def test_demo_runs_without_the_weights_wheel(monkeypatch):
    from safeobs.tools import demo

    def no_wheel(*a, **k):
        raise FileNotFoundError("weights wheel hidden by the test")

    monkeypatch.setattr(models, "_wheel_file", no_wheel)
    res = demo.run(quick=True, mode=None)
    safe = [r for r in res["rows"] if r["setup"] == "safeobs"]
    assert safe and all(r["saturated_lanes"] == 0 for r in safe)
    assert any(r["saturated_lanes"] > 0 for r in res["rows"] if r["setup"] == "full-range 8-bit")


@pytest.mark.parametrize("module,extra", [("skimage", "demo"), ("torchao", "torchao"), ("onnxruntime", "onnx")])
def test_missing_optional_dependency_is_one_line_with_the_pip_command(module, extra):
    msg = cli.missing_dependency(ImportError(f"No module named '{module}'", name=module))
    assert "\n" not in msg and f"pip install 'safeobs[{extra}]'" in msg


def test_cli_demo_without_scikit_image_exits_2_with_one_line():
    """A subprocess in which scikit-image cannot be imported (a meta-path blocker), as after `pip install .`."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('skimage', 'sklearn'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from safeobs import cli\n"
        "sys.exit(cli.main(['demo', '--quick', '--no-real', '-q']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "pip install 'safeobs[demo]'" in err


@pytest.mark.slow
def test_built_wheel_carries_the_demo_weights(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("safeobs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "safeobs/data/_data/mobilenet_v2_demo.npz" in names and "safeobs/data/_data/mobilenet_v2_demo.json" in names
