"""Model files without code execution (issue 17): what ``audit``/``repair`` load by default, and what safeobs saves.

By default only formats that carry no code are read, through loaders that run none:

* a ``torch.save`` of tensors, state dicts and plain containers, read with ``torch.load(weights_only=True)``
  (torch's restricted unpickler: only allow-listed globals; torchao's ``Int8Tensor`` and its few helper
  types are allow-listed here with the ``torch.serialization.safe_globals`` context, so global state is not
  changed).  A *safeobs state file* (:func:`save`) is such a file: a state dict plus the layer list that
  audit and repair need (names, kinds, conv hyper-parameters), so it is audited and repaired without
  rebuilding the model;
* ONNX files (``onnx.load``: protobuf, no code; handled by :mod:`safeobs.onnx.audit`).

Two formats can run code when loaded and need ``trust_pickle=True`` (CLI ``--trust-pickle``): a full Python
pickle (``torch.save(model)``: unpickling calls whatever the file names), and a TorchScript archive
(``torch.jit.load`` runs the TorchScript ``__setstate__`` methods the archive carries; torch's own docstring:
"Only load data you trust").  A state dict is turned into the eager model only by a factory the user names
(``arch="pkg.mod:fn"`` or a callable; CLI ``--arch``): importing it is the user's explicit consent.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping

import torch

from ..core import statefile
from .runtimes import is_script, layers

FORMAT, VERSION = statefile.FORMAT, statefile.VERSION
TRUST = "--trust-pickle (Python: trust_pickle=True)"
TORCHSCRIPT = (
    "a TorchScript archive (torch.jit.save): torch.jit.load runs the TorchScript code it carries "
    "(its __setstate__ methods)"
)
PICKLE = "a full Python pickle (torch.save of a module or other Python objects): unpickling it can run any code"
HOW = (
    f"; pass {TRUST} only if you trust where it comes from, or ask for its state dict "
    "(safeobs.save(model, path)) or an ONNX export"
)


class ModelError(ValueError):
    """A model or input spec that cannot be loaded (the CLI reports it in one line, exit code 2)."""


def _torchao_globals() -> list:
    """torchao's ``Int8Tensor`` and the plain types its pickled state names (empty without torchao)."""
    try:
        from torchao.quantization.granularity import PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    except ImportError:
        return []
    return [Int8Tensor, QuantizeTensorToInt8Kwargs, PerRow, PerTensor, MappingType]


@contextlib.contextmanager
def safe_globals(torchao: bool = True):
    """``torch.serialization.safe_globals`` for the quantized-weight types safeobs reads (torchao's only
    when ``torchao`` and importable); restores torch's allow-list on exit."""
    with torch.serialization.safe_globals(_torchao_globals() if torchao else []):
        yield


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl``, torch's own test)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_weights(path: str, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with torchao's weight types allow-listed; no code runs.

    ``mmap=True`` (zip files, torch.save's default format): the tensors stay in the file, mapped copy-on-write,
    and are read as they are used (a model larger than memory is audited one layer at a time).  Do not
    overwrite the file while such a model is in use.

    Raises :class:`ModelError` naming what the file is when it needs more than the allow-list."""
    kw = {"mmap": True} if mmap and zipfile.is_zipfile(path) else {}
    try:
        try:
            with safe_globals(torchao=False):  # torchao is imported only for files that name it
                return torch.load(path, map_location="cpu", weights_only=True, **kw)
        except pickle.UnpicklingError as e:
            if "torchao" not in str(e) or not _torchao_globals():
                raise
            with safe_globals():
                return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?i)unsupported global:? GLOBAL ([\w.]+)", str(e))
        if found or "weights_only" in str(e).lower() or "Weights only" in str(e):
            need = f" (it names {found.group(1)})" if found else ""
            raise ModelError(f"{path}: {PICKLE}{need}{HOW}") from None
        raise ModelError(f"{path}: not a torch.save file ({str(e).splitlines()[0][:120]})") from None
    except RuntimeError as e:
        raise ModelError(f"{path}: not a torch.save file ({str(e).splitlines()[0][:120]})") from None


def load(path: str, *, trust_pickle: bool = False, arch=None, mmap: bool = False):
    """``(model, source)`` from a model file; see the module docstring for what runs.

    ``source``: "state" (a safeobs state file, without ``arch``: its layers only, enough to audit and
    repair), "state_dict" (a state dict loaded into ``arch()``), "torchscript" or "pickle" (``trust_pickle``)."""
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"trust_pickle must be True or False, got {type(trust_pickle).__name__}")
    if arch is not None and not (callable(arch) or isinstance(arch, str)):
        raise TypeError(f"arch must be 'module:function' or a callable, got {type(arch).__name__}")
    if is_torchscript(path):
        if not trust_pickle:
            raise ModelError(f"{path}: {TORCHSCRIPT}{HOW}")
        if arch is not None:
            raise ModelError(f"{path}: --arch is for state-dict files; this is a TorchScript archive")
        return torch.jit.load(path, map_location="cpu"), "torchscript"
    try:
        obj = load_weights(path, mmap=mmap)
    except ModelError:
        if not trust_pickle:
            raise
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)  # the user trusts this file
        except Exception as e:
            raise ModelError(f"{path}: not a TorchScript file nor a torch.save'd model ({type(e).__name__})") from None
        if not isinstance(obj, torch.nn.Module):
            raise ModelError(f"{path}: holds a {type(obj).__name__}, not a model") from None
        _restore_module_state(obj)
        return obj, "pickle"
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if arch is None and obj.get("layers") is not None:
            return _standin(path, obj), "state"
        return _build(path, obj["state_dict"], arch), "state_dict"
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        if arch is None:
            raise ModelError(
                f"{path}: a state dict; pass --arch module:function (Python: arch=), a function that "
                "returns the converted model to load it into (importing it runs that module)"
            )
        return _build(path, obj, arch), "state_dict"
    raise ModelError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _restore_module_state(model: torch.nn.Module) -> None:
    """Give back the ``nn.Module`` internals that a pickled quantized conv loses.

    ``torch.ao.nn.quantized`` convs define ``__setstate__`` for TorchScript (it restores the packed weight,
    scale and zero point only), so a ``torch.save``'d model that holds one unpickles into a conv without
    ``_modules``, ``_parameters`` or hooks, and ``named_modules`` fails on it.  Its own attributes are intact."""
    stack = [model]
    while stack:
        m = stack.pop()
        d = m.__dict__
        if "_modules" not in d:
            for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_backward_hooks"):
                d.setdefault(key, {})
            torch.nn.Module.__setstate__(m, {})  # the remaining hook tables
        stack.extend(c for c in d["_modules"].values() if isinstance(c, torch.nn.Module))


def _build(path, state_dict, arch):
    """``arch()`` with ``state_dict`` loaded into it (the user named ``arch``: running it is their call)."""
    if arch is None:
        raise ModelError(f"{path}: a state dict without a layer list; pass --arch module:function (Python: arch=)")
    model = call_spec(arch) if isinstance(arch, str) else arch()
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{arch}: returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(state_dict)
    except Exception as e:
        raise ModelError(
            f"{path}: its state dict does not fit the model of {getattr(arch, '__name__', arch)} "
            f"({str(e).splitlines()[0][:160]})"
        ) from None
    return model


# -- safeobs state files ---------------------------------------------------------------------------


def save(model: torch.nn.Module, f, *, arch: str | None = None) -> None:
    """Save ``model``'s state dict and int8 layer list with ``torch.save``; :func:`load` reads it back with
    ``weights_only=True``.  ``arch`` (``"module:function"`` that builds the model) is recorded for the user;
    safeobs never imports it on its own."""
    if isinstance(model, torch.nn.Module) and not is_script(model):
        found = layers(model)
    else:
        found = []  # write() raises the TypeError
    statefile.write(model, f, found, arch=arch)


def _standin(path, bundle) -> torch.nn.Module:
    """The int8 layers of a state file as real quantized modules at their names: audit and repair work on
    them unchanged, and :func:`save` writes their weights back into the state dict."""
    sd = bundle["state_dict"]
    try:
        root = torch.nn.Module()
        for meta in bundle["layers"]:
            mod = _layer_module(meta, sd)
            if not meta["name"]:
                root = mod  # the model is a single layer
                continue
            parent, *_, last = [root] + meta["name"].split(".")
            for part in meta["name"].split(".")[:-1]:
                if part not in parent._modules:
                    parent.add_module(part, torch.nn.Module())
                parent = parent._modules[part]
            parent.add_module(last, mod)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ModelError(
            f"{path}: a safeobs state file whose layer list does not match its state dict "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    root._safeobs_state = bundle
    root.eval()
    return root


def _layer_module(meta: dict, sd: dict) -> torch.nn.Module:
    nnq, nnqd = torch.ao.nn.quantized, torch.ao.nn.quantized.dynamic
    kind, w = meta["kind"], sd[meta["key"]]
    if kind in ("linear", "linear_dynamic"):
        w, b = w
        mod = (nnq.Linear if kind == "linear" else nnqd.Linear)(w.shape[1], w.shape[0], bias_=b is not None)
        mod.set_weight_bias(w, b)
        return mod
    b = sd[meta["bias"]] if meta.get("bias") else None
    if kind == "linear_torchao":
        if type(w).__name__ != "Int8Tensor":
            raise TypeError(f"{meta['name']}: expected a torchao Int8Tensor weight, got {type(w).__name__}")
        mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        mod.weight = torch.nn.Parameter(w, requires_grad=False)
        if b is not None:
            mod.bias = torch.nn.Parameter(b, requires_grad=False)
        return mod
    found = re.fullmatch(r"conv(_transpose)?([123])d", kind)
    if not found or not (isinstance(w, torch.Tensor) and w.is_quantized):
        raise ValueError(f"{meta['name']}: unknown layer kind {kind!r}")
    transposed, nd, g = bool(found.group(1)), int(found.group(2)), int(meta["groups"])
    cls = getattr(nnq, f"ConvTranspose{nd}d" if transposed else f"Conv{nd}d")
    hp = dict(
        stride=tuple(meta["stride"]),
        padding=tuple(meta["padding"]),
        dilation=tuple(meta["dilation"]),
        groups=g,
        bias=b is not None,
    )
    if transposed:
        mod = cls(w.shape[0], w.shape[1] * g, tuple(w.shape[2:]), output_padding=tuple(meta["output_padding"]), **hp)
    else:
        mod = cls(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), **hp)
    mod.set_weight_bias(w, b)
    return mod


# -- loading models and inputs (safeobs.load_model, the CLI) ----------------------------------------


def load_model(
    spec: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | Callable[[], torch.nn.Module] | None = None,
    mmap: bool = False,
) -> tuple[torch.nn.Module, str]:
    """``(model, source)`` from a model file or ``module:function``; nothing in a file runs by default.

    Files: a safeobs state file or a state dict (``torch.load(weights_only=True)``; a plain state dict
    needs ``arch``, the ``module:function`` or callable that builds the model); a full pickle or a
    TorchScript archive only with ``trust_pickle=True`` (see :mod:`safeobs.tools.serialization`).
    ``module:function`` is imported and called (the user named it).  ``source`` is "state",
    "state_dict", "torchscript", "pickle" or "function".  ``mmap=True``: a state file or state dict stays
    in the file, read as it is used (:func:`load_weights`; ``safeobs audit`` does this).  Raises
    :class:`ModelError`.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a path or 'module:function', got {type(spec).__name__}")
    spec = os.fspath(spec)
    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise ModelError(f"{spec}: is a directory, expected a model file")
        return load(spec, trust_pickle=trust_pickle, arch=arch, mmap=mmap)
    if ":" not in spec:
        raise ModelError(f"{spec}: no such file (MODEL is a model file or module:function)")
    if arch is not None:
        raise ModelError(f"{spec}: --arch is for state-dict files, not module:function")
    model = call_spec(spec)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, "function"


def call_spec(spec: str):
    """Import ``module:function`` (the current directory is importable) and call it without arguments."""
    if not isinstance(spec, str):
        raise TypeError(f"expected 'module:function', got {type(spec).__name__}")
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ModelError(f"{spec}: expected module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"{spec}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{spec}: {mod_name!r} has no function {fn_name!r}")
    return fn()


def load_inputs(path: str | None = None, photos: int | None = None, scale: float = 1.0) -> tuple | None:
    """Sample inputs as an argument tuple: a ``torch.save``'d tensor or tuple/list of tensors, or the
    first ``photos`` held-out ImageNet-normalised photos (N, 3, 224, 224); multiplied by ``scale``."""
    if path is not None and photos is not None:
        raise ModelError("give --inputs or --photos, not both")
    if path is not None:
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such inputs file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{path}: cannot load inputs ({type(e).__name__})") from None
        args = tuple(obj) if isinstance(obj, (tuple, list)) else (obj,)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise ModelError(f"{path}: expected a tensor or a tuple/list of tensors")
    elif photos is not None:
        if photos < 1:
            raise ModelError("--photos must be >= 1")
        from .. import data

        x = data.photos("heldout")
        if photos > len(x):
            raise ModelError(f"--photos must be <= {len(x)}")
        args = (x[:photos],)
    else:
        return None
    if scale != 1.0:
        args = tuple(a * scale if a.is_floating_point() else a for a in args)
    return args
