"""``livehead export onnx``: the trained networks as ONNX graphs for the "onnx" backend."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="trained networks -> ONNX graphs (checked for parity) for ONNX Runtime",
        description="Export the stage-1 and stage-2 networks to ONNX, run each graph in ONNX "
        "Runtime against PyTorch on the same inputs (the export fails above tolerance), and "
        "write them with a manifest. By default into the cache directory the engine looks in "
        "for these exact weights, so afterwards `--backend onnx` (bench) or `--set "
        "stream.backend=onnx` (serve, render) just works.",
    )
    fmt = p.add_subparsers(dest="format", metavar="FORMAT")
    o = fmt.add_parser("onnx", help="ONNX (opset 18) + parity check")
    o.add_argument("--stage1", default=None, help="stage-1 safetensors (default: bundled)")
    o.add_argument("--checkpoint", default=None, help="stage-2 safetensors (default: bundled)")
    o.add_argument("--config", default=None, help="config name or .toml (default: the weights')")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    o.add_argument("--out", default=None, help="output directory (default: the engine's cache)")
    o.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the output directory already holds the export of these weights",
    )
    o.add_argument("--json", action="store_true", help="print the manifest as JSON")
    o.set_defaults(func=_onnx)


def _onnx(args: argparse.Namespace) -> int:
    from engine.stream import Engine
    from export.onnx import export_engine

    engine = Engine.load(
        args.stage1, args.checkpoint, config=args.config, overrides=args.set, backend="torch"
    )

    def say(msg: str) -> None:
        if not args.json:
            print(f"livehead: {msg}", file=sys.stderr, flush=True)

    out, manifest, wrote = export_engine(engine, args.out, if_missing=args.if_missing, progress=say)
    if args.json:
        print(json.dumps(dict(manifest, dir=str(out))))
    elif not wrote:
        print(f"{out} already holds the export of these weights")
    else:
        worst = max(manifest["parity"]["max_abs"].values())
        n = len(manifest["graphs"])
        print(f"wrote {out} ({n} graphs; largest |ONNX Runtime - PyTorch| {worst:.2e})")
    return 0
