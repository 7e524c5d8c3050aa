"""Small, real, offline reference data: photos and English sentences.

Photos come from scikit-image and scikit-learn, sentences from the dataset
descriptions bundled with scikit-learn.  The ``calib`` and ``heldout`` splits
are disjoint by *source* (photo or document) and fully deterministic.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PHOTO_SPLITS",
    "SENTENCE_SPLITS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_photo",
    "preprocess",
    "photos",
    "sentences",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Source photos per split.  The motorcycle stereo pair is one scene, so both
# halves live in the same split.
PHOTO_SPLITS = {
    "calib": ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "china", "hubble_deep_field"),
    "heldout": ("chelsea", "coffee", "flower", "immunohistochemistry"),
}
# Source documents (scikit-learn dataset descriptions) per split.
SENTENCE_SPLITS = {
    "calib": ("breast_cancer", "california_housing", "covtype", "diabetes", "iris", "kddcup99", "lfw"),
    "heldout": (
        "digits",
        "linnerud",
        "olivetti_faces",
        "rcv1",
        "species_distributions",
        "twenty_newsgroups",
        "wine_data",
    ),
}
_SPLITS = ("calib", "heldout", "all")


def _check_split(split: str) -> tuple[str, ...]:
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return ("calib", "heldout") if split == "all" else (split,)


# ----------------------------------------------------------------------------- photos
def load_photo(name: str) -> np.ndarray:
    """Return the named source photo as a uint8 (H, W, 3) array."""
    if name in ("china", "flower"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:  # pragma: no cover - depends on environment
            raise ImportError(f"photo {name!r} needs scikit-learn: pip install 'safeobs[demo]'", name="sklearn") from e
        return load_sample_image(f"{name}.jpg")
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(f"photo {name!r} needs scikit-image: pip install 'safeobs[demo]'", name="skimage") from e
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skd.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in ("astronaut", "rocket", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry"):
        img = getattr(skd, name)()
    else:
        raise ValueError(f"unknown photo {name!r}")
    return np.ascontiguousarray(img[..., :3])


def _to_tensor(image) -> torch.Tensor:
    """uint8 (H, W, 3) array/tensor -> float (1, 3, H, W) in [0, 1]."""
    t = torch.as_tensor(np.array(image, copy=True))
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {t.dtype}")
    return t.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = short / min(h, w)
    size = (max(short, round(h * s)), max(short, round(w * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.clamp(0.0, 1.0) - mean) / std


def preprocess(image, size: int = 224) -> torch.Tensor:
    """ImageNet eval transform of one uint8 RGB image -> (1, 3, size, size).

    Resize the shorter side to ``round(size * 256 / 224)`` (antialiased bilinear),
    centre crop ``size`` and normalise with the ImageNet mean/std.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    x = _resize_short(_to_tensor(image), round(size * 256 / 224))
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return _normalise(x[..., top : top + size, left : left + size])


def _crops(image, size: int) -> torch.Tensor:
    """20 deterministic views: 2 scales x (centre + 4 corners) x (plain, h-flip)."""
    x0 = _to_tensor(image)
    out = []
    for short in (round(size * 256 / 224), round(size * 320 / 224)):
        x = _resize_short(x0, short)
        h, w = x.shape[-2:]
        offs = [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
        out += [x[..., t : t + size, l : l + size] for t, l in offs]
    views = torch.cat(out)
    return _normalise(torch.cat([views, views.flip(-1)]))


@lru_cache(maxsize=8)
def _photos_cached(split: str, size: int) -> torch.Tensor:
    names = [n for s in _check_split(split) for n in PHOTO_SPLITS[s]]
    return torch.cat([_crops(load_photo(n), size) for n in names])


def photos(split: str = "calib", size: int = 224) -> torch.Tensor:
    """ImageNet-normalised float tensor (N, 3, size, size) of real photos.

    ``split`` is ``"calib"``, ``"heldout"`` or ``"all"``; the two splits share
    no source photo.  Each photo yields 20 deterministic crops/flips.
    """
    _check_split(split)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    return _photos_cached(split, size).clone()


# -------------------------------------------------------------------------- sentences
_INLINE = [
    (re.compile(r":\w+:`([^`<]*?)\s*(?:<[^>]*>)?`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r"`([^`<]+?)\s*<[^>]*>`_+"), r"\1"),  # `text <url>`_
    (re.compile(r"``([^`]*)``"), r"\1"),  # ``literal``
    (re.compile(r"`([^`]*)`_*"), r"\1"),  # `interpreted`
    (re.compile(r"\*\*?([^*]+)\*\*?"), r"\1"),  # **bold**, *emph*
    (re.compile(r"\[\d+\]_?"), ""),  # citation refs
    (re.compile(r"https?://\S+"), ""),
]
_MARKUP_LINE = re.compile(r"^\s*(\.\.|[=\-~*^+#|]{3,}|:[\w ]+:|[-*+|]\s|\d+\.\s|\(\d+\)|\[\d+\])")
_SENT_SPLIT = re.compile(r"(?<!\b[A-Z]\.)(?<=[.!?])\s+(?=[A-Z(\"])")  # not after initials


def _descr_text(name: str) -> str:
    try:
        from importlib import resources

        return resources.files("sklearn.datasets.descr").joinpath(f"{name}.rst").read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise ImportError("sentences() needs scikit-learn: pip install scikit-learn") from e


def _doc_sentences(text: str) -> list[str]:
    """Prose sentences of one RST document (markup, tables and lists dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(_MARKUP_LINE.match(ln) for ln in lines) or lines[0].startswith((" ", "\t")):
            continue  # directive, table, heading, list, field list or indented block
        prose = " ".join(ln.strip() for ln in lines)
        for pat, rep in _INLINE:
            prose = pat.sub(rep, prose)
        prose = unicodedata.normalize("NFC", re.sub(r"\s+", " ", prose)).strip()
        for s in _SENT_SPLIT.split(prose):
            s = s.strip()
            n_words = len(s.split())
            if (
                5 <= n_words <= 40
                and s[0].isupper()
                and s[-1] in ".!?"
                and s.count("(") == s.count(")")
                and s.count("[") == s.count("]")
                and s.count('"') % 2 == 0
                and sum(c.isalpha() for c in s) >= 0.6 * len(s)
            ):
                out.append(s)
    return out


@lru_cache(maxsize=4)
def _sentences_cached(split: str) -> tuple[str, ...]:
    seen, out = set(), []
    # Iterate both splits in a fixed order so that deduplication is split-independent.
    for s in ("calib", "heldout"):
        for doc in SENTENCE_SPLITS[s]:
            for sent in _doc_sentences(_descr_text(doc)):
                if sent not in seen:
                    seen.add(sent)
                    if s in _check_split(split):
                        out.append(sent)
    return tuple(out)


def sentences(split: str = "calib") -> list[str]:
    """Real English sentences (5-40 words) from scikit-learn's dataset descriptions.

    ``split`` is ``"calib"``, ``"heldout"`` or ``"all"``; the splits come from
    disjoint source documents and share no sentence.
    """
    _check_split(split)
    return list(_sentences_cached(split))
