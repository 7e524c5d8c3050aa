"""Every ```python block of the README and of docs/*.md runs as written, and every relative link in them
points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
# a fence opens at the start of a line (possibly indented inside a list) and closes at the same indentation
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def blocks(page: Path) -> list[str]:
    out = []
    for indent, body in FENCE.findall(page.read_text()):
        out.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return out


BLOCKS = [(page, i, code) for page in PAGES for i, code in enumerate(blocks(page))]


def test_readme_has_examples():
    assert len(blocks(README)) >= 5  # one per flow: torch.ao, PT2E, torchao, ONNX Runtime, OpenVINO


def test_docs_pages_have_examples():
    assert len(BLOCKS) > len(blocks(README))


@pytest.mark.parametrize(
    "page, code",
    [(page, code) for page, _, code in BLOCKS],
    ids=[f"{page.relative_to(ROOT)}:block{i}" for page, i, _ in BLOCKS],
)
def test_example_runs(page, code):
    if "torchao" in code:
        pytest.importorskip("torchao")
    if "onnx" in code:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    if "import openvino" in code:
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    exec(compile(code, str(page), "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_exist(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not inside code blocks
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s)/mailto, or an anchor on the same page
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.name}: broken relative links {missing}"


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    start = "\n".join(lines[:12])
    assert "make demo" in start and "make test" in start
