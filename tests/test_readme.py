"""Every ```python block of the README runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    if "torchao" in code:
        pytest.importorskip("torchao")
    if "import openvino" in code:
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
