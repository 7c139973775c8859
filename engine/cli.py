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


def _controls(args: argparse.Namespace):  # noqa: ANN202 - Controls | None
    from engine.session_api import Controls

    pose = (args.pose_yaw, args.pose_pitch, args.pose_roll)
    if all(v is None for v in pose) and args.location is None and args.scale is None:
        return None
    yaw, pitch, roll = (0.0 if v is None else float(v) for v in pose)
    pose_deg = None if all(v is None for v in pose) else (yaw, pitch, roll)
    return Controls(pose_deg=pose_deg, location=args.location, scale=args.scale)


def _render(args: argparse.Namespace) -> int:
    from engine.errors import UserError
    from engine.render import render_file
    from engine.stream import Engine

    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.seed < 0:
        raise UserError("--seed must be >= 0")
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"stage2.sample_steps={args.steps}")
    if args.noise_scale is not None:
        overrides.append(f"stage2.noise_scale={args.noise_scale}")
    if args.control_guidance is not None:
        overrides.append(f"stage2.control_guidance={args.control_guidance}")
    engine = Engine.load(
        args.stage1,
        args.checkpoint,
        config=args.config,
        overrides=overrides,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
    )
    n = render_file(
        engine,
        args.audio,
        args.out,
        image=args.image,
        seed=args.seed,
        controls=_controls(args),
        pose_file=args.pose_file,
        progress=not args.quiet,
    )
    print(f"wrote {args.out} ({n} frames, {n / 25:.2f} s)")
    return 0


def _bench_stream(args: argparse.Namespace) -> int:
    from engine.bench import run

    run(args)
    return 0


def _bench_modules(args: argparse.Namespace) -> int:
    from engine.bench_modules import run

    run(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="audio-driven animation: a portrait + speech file -> mp4 with the audio",
        description="Generate head and lip motion from --audio with the stage-2 model and "
        "render it onto --image; write an mp4 (25 fps) with the audio muxed. Uses exactly the "
        "streaming engine's windowing, so the result equals a live stream of the same audio "
        "and seed.",
    )
    p.add_argument("--audio", required=True, help="speech (wav, flac, mp3, m4a, mp4, ...)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--image", default=None, help="portrait (default: the bundled avatar)")
    p.add_argument("--seed", type=int, default=0, help="motion seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: config)")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        help="sampling temperature in [0, 2]: lower is steadier, 0 the same for every seed "
        "(default: config's stage2.noise_scale)",
    )
    p.add_argument(
        "--control-guidance",
        type=float,
        default=None,
        help="in [0, 4]: how closely commanded pose/location/scale are followed, 0 = the plain "
        "sampler (default: config's stage2.control_guidance)",
    )
    p.add_argument("--pose-yaw", type=float, default=None, help="fixed yaw, degrees")
    p.add_argument("--pose-pitch", type=float, default=None, help="fixed pitch, degrees")
    p.add_argument("--pose-roll", type=float, default=None, help="fixed roll, degrees")
    p.add_argument("--location", type=float, default=None, help="nose x in [-1, 1]")
    p.add_argument("--scale", type=float, default=None, help="face scale (1 = the portrait's)")
    p.add_argument(
        "--pose-file",
        default=None,
        help="per-frame pose: .npy or text, a (T, 3) array of yaw, pitch, roll in degrees",
    )
    p.add_argument("--config", default=None, help="config name or .toml (default: the weights')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--checkpoint", default=None, help="stage-2 safetensors (default: bundled)")
    p.add_argument("--stage1", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument(
        "--backend",
        default=None,
        help="torch or onnx (after 'livehead export onnx'; default: stream.backend)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: stream.device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_render)

    p = sub.add_parser(
        "reenact",
        help="video-driven animation: a driving video's motion on a portrait",
        description="Read the motion of every frame of --driving and render it onto --image. "
        "Self-reenactment (same person) or cross-reenactment. The driving video's audio is "
        "kept. Without a head reader the stage-1 encoder reads each frame (LIA). Weights with "
        "a trained head reader (stage1.head_reader, the bundled tiny model) read the head's "
        "pose, place and size off every driving frame with it (relative to the portrait's "
        "reading), and with a reader of 14 fields (the bundled one) the mouth, eyelids, brows "
        "and gaze as read; the encoder gives the rest, relative to the video's first frame.",
    )
    p.add_argument("--image", required=True, help="portrait image (face centred)")
    p.add_argument("--driving", required=True, help="driving video (any format PyAV reads)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--checkpoint", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.set_defaults(func=_reenact)

    from engine import bench, bench_modules

    b = sub.add_parser("bench", help="benchmarks: the stream end to end, or single modules")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bsub.add_parser(
        "stream",
        help="a live session fed audio in chunks: latency, fps, A/V offset, memory, drift",
        description=(bench.__doc__ or "").split("\n\n")[0],
    )
    bench.add_args(p)
    p.set_defaults(func=_bench_stream)
    p = bsub.add_parser(
        "modules",
        help="per-network speed (encoder, renderer) in fp32/bf16 variants",
        description=(bench_modules.__doc__ or "").split("\n\n")[0],
    )
    bench_modules.add_args(p)
    p.set_defaults(func=_bench_modules)
