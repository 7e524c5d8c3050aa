"""Reference models (real weights) and reference data."""

import pytest
import torch
import torch.fx

from safeobs import data
from safeobs.data import models

skd = pytest.importorskip("skimage.data")

# Reference values computed once with Hugging Face transformers' BertModel and
# BertTokenizerFast on the same wheel files (not a dependency of safeobs).
HF_EMBED_FIRST8 = [
    [0.02166, -0.00486, -0.00965, -0.0634, -0.16749, 0.00468, 0.0806, -0.02414],
    [0.03144, 0.00881, 0.00251, -0.09471, -0.19351, 0.05606, 0.10961, 0.04611],
    [0.06046, 0.00545, 0.07657, 0.05383, -0.01479, -0.0061, -0.02938, 0.05372],
]
HF_COS = {(0, 1): 0.67521, (0, 2): -0.05403, (1, 2): -0.05913}
HF_IDS = {
    "Héllo, wörld! naïve café — 3.5×10⁶ CPUs; e-mail: a@b.c": [
        101,
        7592,
        1010,
        2088,
        999,
        15743,
        7668,
        1517,
        1017,
        1012,
        1019,
        26306,
        10790,
        30075,
        17368,
        2015,
        1025,
        1041,
        1011,
        5653,
        1024,
        1037,
        1030,
        1038,
        1012,
        1039,
        102,
    ],
    "日本語のテキスト and ümlauts": [
        101,
        1864,
        1876,
        1950,
        1671,
        30239,
        30227,
        30233,
        30240,
        1998,
        8529,
        17298,
        3215,
        102,
    ],
    "The unaffable fox's CPU-bound jobs.": [
        101,
        1996,
        14477,
        20961,
        3468,
        4419,
        1005,
        1055,
        17368,
        1011,
        5391,
        5841,
        1012,
        102,
    ],
}
TRIPLE = ["A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."]
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def mnv2():
    return models.mobilenet_v2()


@pytest.fixture(scope="module")
def bert():
    return models.minilm()


def _top1(model, image):
    with torch.no_grad():
        return int(model(data.preprocess(image)).argmax(1))


# ------------------------------------------------------------------ MobileNetV2
def test_mobilenet_classifies_real_photos(mnv2):
    assert not mnv2.training
    assert _top1(mnv2, skd.chelsea()) in CATS  # observed: 285 Egyptian cat (p=0.71)
    assert _top1(mnv2, skd.coffee()) in COFFEE  # observed: 967 espresso (p=0.99)


def test_mobilenet_structure_matches_torchvision(mnv2):
    sd = mnv2.state_dict()
    assert "features.0.0.weight" in sd and "features.1.conv.0.0.weight" in sd
    assert "features.2.conv.0.0.weight" in sd and "features.2.conv.3.running_var" in sd
    assert "features.18.0.weight" in sd and tuple(sd["classifier.1.weight"].shape) == (1000, 1280)
    assert sum(p.numel() for p in mnv2.parameters()) == 3_504_872
    assert isinstance(mnv2.classifier[0], torch.nn.Dropout) and mnv2.classifier[0].p == 0.2


def test_mobilenet_relu_variant_loads_strictly():
    m = models.mobilenet_v2(relu6=False)
    acts = {type(mod) for mod in m.modules() if isinstance(mod, (torch.nn.ReLU, torch.nn.ReLU6))}
    assert acts == {torch.nn.ReLU}
    assert _top1(m, skd.chelsea()) in CATS


def test_mobilenet_bad_args(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.mobilenet_v2(tmp_path / "nope.pth")
    with pytest.raises(TypeError):
        models.mobilenet_v2(relu6="yes")


def test_mobilenet_fx_traceable(mnv2):
    gm = torch.fx.symbolic_trace(mnv2)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), mnv2(x))
    assert (
        sum(n.target is torch.ops.aten.add.Tensor or getattr(n.target, "__name__", "") == "add" for n in gm.graph.nodes)
        == 10
    )  # the 10 residual adds


# ------------------------------------------------------------------ MiniLM
def test_tokenizer_matches_reference():
    tok = models.tokenizer()
    for text, ids in HF_IDS.items():
        assert tok.encode(text) == ids, text
    b = tok(["hello world", "a b c d"])
    assert b["input_ids"].tolist() == [[101, 7592, 2088, 102, 0, 0], [101, 1037, 1038, 1039, 1040, 102]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    long = tok(["word " * 500], padding="max_length")
    assert long["input_ids"].shape == (1, 128) and long["input_ids"][0, -1] == tok.sep_id


def test_minilm_embeddings_match_reference(bert):
    e = models.embed(bert, TRIPLE)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e[:, :8], torch.tensor(HF_EMBED_FIRST8), atol=2e-5, rtol=0)
    cos = e @ e.T
    for (i, j), v in HF_COS.items():
        assert abs(cos[i, j].item() - v) < 1e-4
    assert cos[0, 1] > cos[0, 2] + 0.5 and cos[0, 1] > cos[1, 2] + 0.5


def test_minilm_padding_invariant(bert):
    # the same sentence alone and padded inside a batch embeds identically
    alone = models.embed(bert, TRIPLE[:1])
    batched = models.embed(bert, [TRIPLE[0], "a much longer sentence " * 6])[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


def test_minilm_fx_traceable_and_linears(bert):
    assert sum(isinstance(m, torch.nn.Linear) for m in bert.modules()) == 6 * 6 + 1
    gm = torch.fx.symbolic_trace(bert)
    b = models.tokenizer()(TRIPLE)
    with torch.no_grad():
        torch.testing.assert_close(gm(b["input_ids"], b["attention_mask"]), bert(b["input_ids"], b["attention_mask"]))


def test_safetensors_roundtrip(tmp_path):
    import json

    import numpy as np

    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1, -2], dtype="<i8")
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
        "__metadata__": {"x": "y"},
    }
    h = json.dumps(header).encode()
    p = tmp_path / "t.safetensors"
    p.write_bytes(len(h).to_bytes(8, "little") + h + a.tobytes() + b.tobytes())
    out = models.load_safetensors(p)
    assert out["a"].tolist() == a.tolist() and out["b"].tolist() == [1, -2] and out["b"].dtype == torch.int64


# ------------------------------------------------------------------ data
def test_photo_splits_disjoint_and_shaped():
    cal, held = data.PHOTO_SPLITS["calib"], data.PHOTO_SPLITS["heldout"]
    assert not set(cal) & set(held)
    x = data.photos("calib")
    y = data.photos("heldout")
    assert x.shape == (20 * len(cal), 3, 224, 224) and x.dtype == torch.float32
    assert y.shape == (20 * len(held), 3, 224, 224)
    assert torch.equal(x, data.photos("calib"))  # deterministic
    assert torch.equal(data.photos("all"), torch.cat([x, y]))
    assert abs(x.mean().item()) < 1.0 and 0.5 < x.std().item() < 2.0  # ImageNet-normalised
    assert data.photos("heldout", size=96).shape == (20 * len(held), 3, 96, 96)
    with pytest.raises(ValueError):
        data.photos("train")


def test_sentence_splits_disjoint():
    pytest.importorskip("sklearn")
    cal, held = data.sentences("calib"), data.sentences("heldout")
    assert len(cal) >= 20 and len(held) >= 20
    assert not set(cal) & set(held)
    assert data.sentences("all") == cal + held and data.sentences("calib") == cal
    for s in cal + held:
        assert 5 <= len(s.split()) <= 40 and s[-1] in ".!?"
        assert not any(m in s for m in ("``", ":ref:", "====", "|"))
    with pytest.raises(TypeError):
        data.sentences(3)
