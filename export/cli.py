"""``livehead export onnx``: the trained networks as ONNX graphs for the "onnx" backend."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from engine.backends_ort import default_onnx_dir, model_fingerprint, read_manifest
    from engine.errors import UserError
    from engine.stream import Engine, plan_dict
    from export.onnx import export_onnx

    engine = Engine.load(
        args.stage1, args.checkpoint, config=args.config, overrides=args.set, backend="torch"
    )
    stage1 = engine.stage1.model  # type: ignore[attr-defined]
    stage2 = engine.stage2.nets  # type: ignore[attr-defined]
    plan = plan_dict(engine.cfg)
    fingerprint = model_fingerprint(stage1, stage2, plan)
    out = Path(args.out) if args.out else default_onnx_dir(fingerprint)
    if args.if_missing:
        try:
            manifest = read_manifest(out, fingerprint)
        except UserError:
            pass
        else:
            if args.json:
                print(json.dumps(dict(manifest, dir=str(out))))
            else:
                print(f"{out} already holds the export of these weights")
            return 0

    def say(msg: str) -> None:
        if not args.json:
            print(f"livehead: {msg}", file=sys.stderr, flush=True)

    source = {"stage1": engine.info.get("stage1"), "stage2": engine.info.get("stage2")}
    manifest = export_onnx(stage1, stage2, plan, out, source=source, progress=say)
    if args.json:
        print(json.dumps(dict(manifest, dir=str(out))))
    else:
        worst = max(manifest["parity"]["max_abs"].values())
        print(f"wrote {out} (5 graphs; largest |ONNX Runtime - PyTorch| {worst:.2e})")
    return 0
