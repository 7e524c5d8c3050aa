"""The ``safeobs`` command: ``demo``, ``audit MODEL``, ``repair MODEL -o OUT``.

Exit codes: 0 success (audit: safe), 1 audit found a layer that can saturate, 2 usage error
(bad arguments, paths or models: one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

EXIT_OK, EXIT_UNSAFE, EXIT_USAGE = 0, 1, 2

MAIN_EPILOG = """\
examples:
  safeobs demo --quick                       # the forum's bad Conv2d output, real kernel vs emulator
  safeobs audit model.pt                     # which layers can saturate, per engine/ISA (exit 1 if any)
  safeobs audit mypkg.models:quantized --photos 2 --json > audit.json
  safeobs repair mypkg.models:quantized -o model_safe.pt   # re-quantize only the unsafe channels
  safeobs audit model_safe.pt                # exit 0: safe on every engine/ISA

Model files are read without running code in them: state dicts (torch.load weights_only=True) and
.onnx.  A full pickle (torch.save(model)) or a TorchScript archive can run code when loaded: safeobs
loads those only with --trust-pickle.  See docs/security.md.
"""

DEMO_EPILOG = """\
Four setups on MobileNetV2's stem conv (features.0.0) and a depthwise conv (features.2.conv.1.0),
BatchNorm folded, calibrated on calibration photos and run on held-out photos and on the same
inputs x2: torch's x86 default qconfig (7-bit activations), full-range 8-bit activations with
torch's weights, 7-bit weights, and safeobs (8-bit activations, safe weights).  The real kernel
runs natively on AVX2 hosts, else under qemu Haswell, else with the ISA forced to AVX2.

examples:
  safeobs demo                 # 24 calibration / 12 held-out photos
  safeobs demo --quick         # 6 / 2 photos (CI)
  safeobs demo --json > demo.json
  safeobs demo --no-real       # emulator only
"""

AUDIT_EPILOG = """\
MODEL is a converted (quantized) model:
  a safeobs state file (safeobs.save, safeobs.torchao.save, safeobs repair -o), a state dict with
  --arch, an .onnx file, an OpenVINO IR .xml (with its .bin); module:function, a function (importable
  from the current directory) that returns the eager converted model (convert_fx /
  torch.ao.quantization.convert); or, with
  --trust-pickle only, a TorchScript file (torch.jit.save) or a torch.save(model) pickle.

What runs: state files and state dicts are read with torch.load(weights_only=True) and .onnx with
onnx.load (an OpenVINO .xml/.bin with ov.Core.read_model): no code from the file runs.
module:function and --arch import and run the code you name.
A pickle or TorchScript file can run code as it is loaded, hence --trust-pickle (only for files you
trust).  --inputs/--photos execute the model's forward pass: for a pickled module or a TorchScript
file that is code from the file too.

Per layer and engine/ISA (fbgemm, onednn, x86 x avx2, avx512, avx512_vbmi, vnni) the table shows the kernel
path torch dispatches to and how many output channels hold a weight pair that this kernel adds
into one int16 lane and that can saturate for some u8 activation (path:N), path:ok when none,
path:exact when the kernel accumulates exactly (VNNI, oneDNN depthwise).

With sample inputs (--inputs FILE: torch.save of a tensor or a tuple/list of tensors, the model's
positional arguments; or --photos N: N held-out ImageNet-normalised photos, shape (N,3,224,224))
the emulator also counts the int16 lanes that actually saturate, per layer and engine/ISA.  This
needs the eager model (module:function, --arch, or a trusted pickle); TorchScript files and state
files without --arch are audited from their weights only.

exit status: 0 safe, 1 some layer can saturate, 2 usage error.

examples:
  safeobs audit model.pt
  safeobs audit model.pt --unsafe-only --engines x86/avx2,x86/vnni
  safeobs audit mypkg.models:quantized --photos 2
  safeobs audit mypkg.models:quantized --inputs batch.pt --input-scale 2 --json
"""

REPAIR_EPILOG = """\
Only channels with a weight pair that can saturate under --layout are re-quantized, at the
tightest safe scale computed from the dequantized weights (no data needed).  Per-tensor weights
change as a whole.  Every other channel keeps its codes, scale and zero point bit for bit; bias
and output scale/zero point never change.

Output: an eager MODEL is saved as a safeobs state file (state dict + layer list, torch.save of
tensors only): safeobs audit/repair read it back with no flag, and safeobs.load_model(OUT,
arch="pkg.mod:fn") or model.load_state_dict(torch.load(OUT)["state_dict"]) gives the model back.
With --inputs/--photos it is traced and saved as TorchScript instead, and a TorchScript MODEL stays
TorchScript (torch.jit.save): reading either again needs --trust-pickle.

layouts: x86 (default: every kernel torch may pick on any x86 CPU), fbgemm, onednn.

examples:
  safeobs repair mypkg.models:quantized -o model_safe.pt
  safeobs repair model_safe.pt -o model_safe.pt --layout fbgemm --json
  safeobs repair scripted.pt --trust-pickle -o scripted_safe.pt   # TorchScript you trust
"""


class _Progress:
    """``progress(i, n, label)`` callback drawing a ``tqdm`` bar on stderr (silent with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, i: int, n: int, label: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=n, file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(i - self.bar.n)
        if i >= n:
            self.bar.close()
            self.bar = None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default, but one line and our exit code
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="safeobs",
        description="int8 quantization for x86 CPUs without vpmaddubsw int16 saturation",
        epilog=MAIN_EPILOG,
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "demo",
        help="reproduce the forum's bad quantized Conv2d output on real weights and photos",
        description="Reproduce 'Quantized Conv2d op bad output' end to end.",
        epilog=DEMO_EPILOG,
        formatter_class=fmt,
    )
    d.add_argument("--quick", action="store_true", help="few photos (CI): 6 calibration, 2 held-out")
    d.add_argument("--calib", type=int, metavar="N", help="calibration photos (default 24, --quick 6)")
    d.add_argument("--eval", type=int, metavar="N", help="held-out photos (default 12, --quick 2)")
    d.add_argument("--no-real", action="store_true", help="skip the real kernel (emulator only)")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def model_args(sp):
        sp.add_argument(
            "model",
            metavar="MODEL",
            help="safeobs state file, state dict (with --arch), .onnx, "
            "module:function, or (--trust-pickle) TorchScript / torch.save(model) file",
        )
        sp.add_argument(
            "--trust-pickle",
            action="store_true",
            help="also load a full pickle or TorchScript file: loading either can run code in it; "
            "only for files you trust",
        )
        sp.add_argument(
            "--arch",
            metavar="MODULE:FUNCTION",
            help="for a state-dict MODEL: import MODULE and call FUNCTION() to build the model the "
            "weights are loaded into (runs that code)",
        )
        g = sp.add_mutually_exclusive_group()
        g.add_argument(
            "--inputs",
            metavar="FILE",
            help="torch.save'd tensor or tuple/list of tensors (read "
            "weights-only); runs the model, i.e. the code of a pickled or TorchScript MODEL",
        )
        g.add_argument("--photos", type=int, metavar="N", help="N held-out photos as input (image models)")
        sp.add_argument(
            "--input-scale",
            type=float,
            default=1.0,
            metavar="F",
            help="multiply float inputs by F (e.g. 2: beyond the calibrated range)",
        )
        sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    a = sub.add_parser(
        "audit",
        help="which layers of a converted model can saturate, per engine/ISA",
        description="Audit a converted model for int16 pair saturation.",
        epilog=AUDIT_EPILOG,
        formatter_class=fmt,
    )
    model_args(a)
    a.add_argument(
        "--engines",
        metavar="E/I,...",
        help="engine/isa pairs to audit (default: all of fbgemm,onednn,x86 x avx2,avx512,avx512_vbmi,vnni)",
    )
    a.add_argument("--unsafe-only", action="store_true", help="list only layers that can saturate")

    r = sub.add_parser(
        "repair",
        help="re-quantize only the unsafe channels of a converted model",
        description="Repair a converted model so that no weight pair can saturate.",
        epilog=REPAIR_EPILOG,
        formatter_class=fmt,
    )
    model_args(r)
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="where to save the repaired model")
    r.add_argument(
        "--layout",
        default=None,
        choices=("x86", "fbgemm", "onednn", "ort", "openvino"),
        help="kernels to be safe for (default x86: all of them; ort for .onnx models)",
    )
    r.add_argument("--all", action="store_true", help="list unchanged layers too")
    return p


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)


def _dump(obj) -> str:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1, default=_json_default)


def cmd_demo(args) -> int:
    from .tools import demo

    for n, name in ((args.calib, "--calib"), (args.eval, "--eval")):
        if n is not None and n < 1:
            raise UsageError(f"{name} must be >= 1")
    mode = None if args.no_real else "auto"
    result = demo.run(quick=args.quick, calib=args.calib, evaluate=args.eval, mode=mode, progress=_Progress(args.quiet))
    print(_dump(result) if args.json else demo.format_demo(result))
    return EXIT_OK


def _model_and_inputs(args, mmap: bool = False):
    from .tools.serialization import load_inputs, load_model

    model, source = load_model(args.model, trust_pickle=args.trust_pickle, arch=args.arch, mmap=mmap)
    inputs = load_inputs(args.inputs, args.photos, args.input_scale)
    return model, source, inputs


def _file_command(rt, name: str, args) -> int:
    """A model file another runtime reads (MODEL.onnx: safeobs.onnx.audit); bad input is a usage error."""
    try:
        adapter = rt.load()
    except ImportError as e:
        raise UsageError(str(e)) from None
    if name == "repair":
        args.layout, args.layout_default = args.layout or getattr(adapter, "DEFAULT_LAYOUT", "ort"), args.layout is None
    try:
        return getattr(adapter, f"cmd_{name}")(args, _dump)
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None


def cmd_audit(args) -> int:
    from .tools import audit, runtimes

    rt = runtimes.for_file(args.model)
    if rt is not None:
        return _file_command(rt, "audit", args)
    combos = None  # audit picks COMBOS, or TORCHAO_COMBOS (eager|compiled/isa) for a torchao quantize_ model
    if args.engines:
        combos = tuple(c.strip() for c in args.engines.split(",") if c.strip())
        known = audit.COMBOS + audit.TORCHAO_COMBOS
        bad = [c for c in combos if c not in known]
        if bad or not combos:
            raise UsageError(f"--engines: unknown {', '.join(bad) or 'empty list'}; choose from {','.join(known)}")
    model, source, inputs = _model_and_inputs(args, mmap=True)  # read-only: weights stay in the file until used
    progress = _Progress(args.quiet)
    result = audit.audit(model, inputs, combos, progress=progress)
    result["model"], result["source"] = args.model, source
    if not result["layers"]:
        raise UsageError(f"{args.model}: no quantized Linear/Conv layer with int8 weights (is it converted?)")
    print(_dump(result) if args.json else audit.format_audit(result, only_unsafe=args.unsafe_only))
    return EXIT_UNSAFE if result["unsafe"] else EXIT_OK


def cmd_repair(args) -> int:
    import os

    from .tools import repair, runtimes

    parent = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(parent):
        raise UsageError(f"{args.output}: cannot write there (a directory, or its folder does not exist)")
    rt = runtimes.for_file(args.model)
    if rt is not None:
        if not os.path.isfile(args.model):
            raise UsageError(f"{args.model}: no such file")
        return _file_command(rt, "repair", args)
    args.layout = args.layout or "x86"
    model, source, inputs = _model_and_inputs(args)
    if inputs is not None and source == "state":
        raise UsageError(
            f"{args.model}: --inputs/--photos trace the model to TorchScript, and a state file holds "
            "its layers, not its forward pass: pass --arch module:function too"
        )
    infos = repair.repair(model, args.layout)
    if not infos:
        raise UsageError(f"{args.model}: no quantized Linear/Conv layer with int8 weights (is it converted?)")
    try:
        fmt = repair.save(model, args.output, inputs, arch=args.arch or (args.model if source == "function" else None))
    except OSError as e:
        raise UsageError(f"{args.output}: cannot write ({e.strerror or e})") from None
    if args.json:
        print(
            _dump({"model": args.model, "output": args.output, "format": fmt, "layout": args.layout, "layers": infos})
        )
    else:
        print(repair.format_repair(infos, only_changed=not args.all))
        print(f"saved {fmt} to {args.output}")
    return EXIT_OK


_EXTRAS = {
    "skimage": "demo",
    "sklearn": "demo",
    "torchao": "torchao",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "openvino": "openvino",
    "nncf": "openvino",
}


def missing_dependency(e: ImportError) -> str:
    """One line for a missing optional dependency: what is missing and the pip command that installs it."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name in _EXTRAS:
        return f"{name} is not installed (needed here); install it with: pip install 'safeobs[{_EXTRAS[name]}]'"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg if "pip install" in msg else f"{msg}; install the missing package with pip"


class UsageError(Exception):
    """Bad arguments: reported in one line, exit code 2."""


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*quantiz.*deprecat.*")  # pytorch/pytorch#184982
    warnings.filterwarnings("ignore", category=torch_warning_categories())
    warnings.filterwarnings("ignore", message=".*reduce_range.*")  # the demo uses torch's onednn qconfig on purpose
    warnings.filterwarnings("ignore", module=r"torch\..*")  # deprecation chatter of torch.ao / torch.jit
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    import torch

    from .tools.serialization import ModelError

    torch.backends.quantized.engine = "x86"
    try:
        return {"demo": cmd_demo, "audit": cmd_audit, "repair": cmd_repair}[args.command](args)
    except (UsageError, ModelError) as e:
        sys.stderr.write(f"safeobs {args.command}: error: {e}\n")
        return EXIT_USAGE
    except ImportError as e:  # a missing optional dependency: one line that names the pip command
        sys.stderr.write(f"safeobs {args.command}: error: {missing_dependency(e)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


def torch_warning_categories():
    """Warning category silenced on the command line (torch's TracerWarnings while tracing a repaired model)."""
    try:
        from torch.jit import TracerWarning

        return TracerWarning
    except Exception:  # pragma: no cover
        return UserWarning


if __name__ == "__main__":
    sys.exit(main())
