"""``livehead data ...``: the synthetic talking-head world on the command line.

    livehead data synth --out data/synth --clips 100 --seconds 4 --size 256 --split train
    livehead data sheet --out sheet.png --n 24 --size 128
    livehead data prepare VIDEOS... --out data/real     (training/realdata)

Heavy modules are imported inside the handlers so ``livehead --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.config import add_config_args
from engine.errors import UserError

CLI_STREAM = 3  # SeedSequence tag for the CLI's choice of identities and clip seeds


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="world.seed=3")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="synthetic talking-head data: make clips, draw contact sheets",
        description="The synthetic talking-head world: procedurally drawn faces speaking "
        "espeak-ng speech, with every motion parameter known.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    synth = sub.add_parser(
        "synth",
        help="write synthetic clips (NAME.mp4 + NAME.npz ground truth)",
        description="Write N clips to DIR: NAME.mp4 (H.264 + AAC, 25 fps, 16 kHz audio) and "
        "NAME.npz (per-frame motion ground truth, identity id, text, float32 audio), plus "
        "manifest.jsonl. Identities come from the training ids (or the held-out ids with "
        "--split heldout, which also uses the held-out sentence pool).",
    )
    synth.add_argument("--out", required=True, type=Path, help="output directory")
    synth.add_argument("--clips", type=int, default=10, help="number of clips (default 10)")
    synth.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4)")
    synth.add_argument("--size", type=int, default=256, help="frame size in pixels (even)")
    synth.add_argument("--seed", type=int, default=0, help="which clips (default 0)")
    synth.add_argument("--split", choices=["train", "heldout"], default="train")
    _add_config_args(synth)
    synth.set_defaults(func=_cmd_synth)

    sheet = sub.add_parser(
        "sheet",
        help="draw a contact sheet of identities in random poses",
        description="Draw a grid of N identities, each in a random pose and expression.",
    )
    sheet.add_argument("--out", required=True, type=Path, help="output image (.png)")
    sheet.add_argument("--n", type=int, default=24, help="number of faces (default 24)")
    sheet.add_argument("--size", type=int, default=128, help="tile size in pixels")
    sheet.add_argument("--seed", type=int, default=0, help="which identities and poses")
    sheet.add_argument("--split", choices=["train", "heldout"], default="train")
    _add_config_args(sheet)
    sheet.set_defaults(func=_cmd_sheet)

    avatar = sub.add_parser(
        "avatar",
        help="draw one identity, frontal and neutral, as a portrait (the bundled avatar)",
        description="Write a frontal neutral portrait of one identity (default: held-out "
        "identity 4805, the bundled weights/avatar.png).",
    )
    avatar.add_argument("--out", required=True, type=Path, help="output image (.png)")
    avatar.add_argument("--id", type=int, default=4805, help="identity id (default 4805)")
    avatar.add_argument("--size", type=int, default=256, help="size in pixels")
    avatar.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    _add_config_args(avatar)
    avatar.set_defaults(func=_cmd_avatar)

    # Real videos -> training clips (training/realdata); absent in trimmed installs.
    try:
        from training.realdata.cli import add_prepare_args
    except ImportError:
        return
    prepare = sub.add_parser("prepare", help="turn real talking-face videos into training clips")
    add_prepare_args(prepare)


def _check_common(args: argparse.Namespace) -> None:
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not 16 <= args.size <= 2048:
        raise UserError(f"--size must be in [16, 2048] pixels, got {args.size}")


def _cmd_avatar(args: argparse.Namespace) -> int:
    _check_common(args)
    from PIL import Image

    from engine.config import load_config
    from training.world import get_identity, neutral_motion, render_frames

    cfg = load_config(args.config, args.override)
    if not 0 <= args.id < cfg.world.identities:
        raise UserError(f"--id must be in [0, {cfg.world.identities}), got {args.id}")
    img = render_frames(get_identity(cfg.world, args.id), neutral_motion(1), args.size)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    _check_common(args)
    if args.clips < 1:
        raise UserError(f"--clips must be at least 1, got {args.clips}")
    if not 0 < args.seconds <= 600:
        raise UserError(f"--seconds must be in (0, 600], got {args.seconds}")
    if args.size % 2:
        raise UserError(f"--size must be even (H.264 with yuv420p), got {args.size}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a directory")

    import numpy as np
    from tqdm import tqdm

    from engine.config import load_config
    from training.world.clip import make_clip
    from training.world.identity import heldout_ids, train_ids
    from training.world.io import write_clip
    from training.world.speech import check_espeak

    cfg = load_config(args.config, args.override).world
    check_espeak()
    ids = train_ids(cfg) if args.split == "train" else heldout_ids(cfg)
    if len(ids) == 0:
        raise UserError(f"the config has no {args.split} identities")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, CLI_STREAM, args.seed]))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "manifest.jsonl", "w") as manifest:
        for i in tqdm(range(args.clips), desc="clips", unit="clip"):
            identity_id = int(rng.choice(ids))
            clip_seed = int(rng.integers(2**31))
            clip = make_clip(cfg, identity_id, args.seconds, args.size, clip_seed, args.split)
            name = f"clip_{i:05d}"
            write_clip(clip, args.out, name)
            entry = {
                "name": name,
                "identity_id": identity_id,
                "seed": clip_seed,
                "split": args.split,
                "frames": clip.num_frames,
                "size": args.size,
                "text": clip.text,
            }
            manifest.write(json.dumps(entry) + "\n")
    print(f"wrote {args.clips} clips to {args.out}")
    return 0


def _cmd_sheet(args: argparse.Namespace) -> int:
    _check_common(args)
    if not 1 <= args.n <= 10_000:
        raise UserError(f"--n must be in [1, 10000], got {args.n}")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out must end in .png or .jpg, got {args.out}")

    import numpy as np
    from PIL import Image

    from engine.config import load_config
    from training.world.identity import get_identity, heldout_ids, train_ids
    from training.world.motion import random_motion
    from training.world.render import render_frame

    cfg = load_config(args.config, args.override).world
    ids = train_ids(cfg) if args.split == "train" else heldout_ids(cfg)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, CLI_STREAM, args.seed, 1]))
    chosen = rng.choice(ids, size=min(args.n, len(ids)), replace=False)
    motion = random_motion(rng, len(chosen))
    cols = int(np.ceil(np.sqrt(len(chosen) * 1.5)))
    rows = int(np.ceil(len(chosen) / cols))
    s = args.size
    sheet = np.full((rows * s, cols * s, 3), 255, np.uint8)
    for k, identity_id in enumerate(chosen):
        r, c = divmod(k, cols)
        tile = render_frame(get_identity(cfg, int(identity_id)), motion[k], s)
        sheet[r * s : (r + 1) * s, c * s : (c + 1) * s] = tile
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out)
    print(f"wrote {args.out} ({len(chosen)} identities, {cols}x{rows})")
    return 0
