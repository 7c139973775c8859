"""Inference commands: ``livehead reenact``, ``livehead render``, ``livehead bench``."""

from __future__ import annotations

import argparse


def _reenact(args: argparse.Namespace) -> int:
    from engine.loading import load_stage1
    from engine.reenact import reenact_file

    if args.max_frames is not None and args.max_frames < 1:
        from engine.errors import UserError

        raise UserError("--max-frames must be at least 1")
    model, _, _ = load_stage1(args.checkpoint)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    n = reenact_file(model, args.image, args.driving, args.out, max_frames=args.max_frames)
    print(f"wrote {args.out} ({n} frames)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reenact",
        help="video-driven animation: a driving video's motion on a portrait",
        description="Read the motion of every frame of --driving with the stage-1 encoder and "
        "render it onto --image. Self-reenactment (same person) or cross-reenactment. The "
        "driving video's audio is kept.",
    )
    p.add_argument("--image", required=True, help="portrait image (face centred)")
    p.add_argument("--driving", required=True, help="driving video (any format PyAV reads)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--checkpoint", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.set_defaults(func=_reenact)
