"""`harness` command line: one entry point, thin subcommands that parse, call library code
and print where the results went. Exit status: 0 everything asked for ran and passed, 1 a
check failed or something asked for did not run (the report says which), 2 bad input or
usage (one line), 130 interrupted. Bugs keep their traceback with --debug.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from harness.errors import UserError

# subcommand → module defining `add_arguments(parser)` and `run(args) -> int`.
# Modules are imported only when their command runs, so a broken optional dependency
# never breaks `harness --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("harness.commands.synth", "write a deterministic synthetic COCO-format dataset"),
    "detect": ("harness.commands.detect", "run the model source on images and print detections"),
    "demo": ("harness.commands.demo", "run the main job on the bundled fixture model and data"),
    "export": ("harness.commands.export", "export the detector to ONNX (any variant, precision)"),
    "build": ("harness.commands.build", "build a TensorRT engine from an ONNX file"),
    "check": ("harness.commands.check", "TensorRT pre-flight of an ONNX file, on the CPU"),
    "compare": ("harness.commands.compare",
                "diff PyTorch against ONNX files / TensorRT engines, layer by layer and after NMS"),
    "coco": ("harness.commands.coco", "COCO mAP and latency across backends, precisions, batches"),
    "sensitivity": ("harness.commands.sensitivity",
                    "which layer groups to keep in fp32 under int8 / fp16, judged by mAP"),
}


EXIT_STATUS = """exit status:
  0    everything asked for ran (and every gate passed)
  1    a gate or check failed, or something asked for did not run: a target or matrix row
       not available here or not comparable, an unreadable image (the report says which)
  2    bad input or usage: a missing or corrupt file, a wrong option (one line says what)
  130  interrupted (Ctrl-C); long runs resume from what they stored"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Compare a detector across PyTorch, ONNX Runtime and TensorRT.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        sp = sub.add_parser(name, help=summary, description=summary, epilog=EXIT_STATUS,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional package: say so when it is used
            sp.set_defaults(_run=_missing(name, exc))
            continue
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def _missing(name: str, exc: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise UserError(f"'harness {name}' is unavailable: {exc}")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return 130


def writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or raise a UserError saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".harness-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {path}: {exc.strerror or exc}; choose another "
                        "output folder") from None
    return path


if __name__ == "__main__":
    sys.exit(main())
