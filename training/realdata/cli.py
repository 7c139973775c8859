"""Arguments and entry point of ``livehead data prepare`` (wired up by ``training/cli.py``).

livehead data prepare ../shared/data/real/video --out data/real --min-face 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.realdata.options import PrepareOptions

DEFAULTS_NOTE = "defaults follow AniTalker: 256² faces and output, 25 fps, 16 kHz mono audio"


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` options to ``parser`` (and set ``func`` to ``run_prepare``)."""
    d = PrepareOptions()
    parser.description = (
        "Turn raw talking-face videos into a training set: fixed 1.6x face crops per clip "
        f"(no alignment), filtered by face size, blur and yaw; {DEFAULTS_NOTE}."
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="video files or folders (searched recursively)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--min-face",
        type=int,
        default=d.min_face,
        help="drop clips whose median face box is smaller than this many source pixels "
        "(default %(default)s; lower it for small videos)",
    )
    parser.add_argument("--size", type=int, default=d.size, help="output side in pixels")
    parser.add_argument(
        "--clip-seconds",
        type=float,
        default=d.clip_seconds,
        help="split face segments into clips of this to twice this length (default %(default)s)",
    )
    parser.add_argument(
        "--min-clip-seconds",
        type=float,
        default=d.min_clip_seconds,
        help="drop face segments shorter than this (default %(default)s)",
    )
    parser.add_argument(
        "--clips-per-identity",
        type=int,
        default=d.clips_per_identity,
        help="keep at most this many clips per identity (default %(default)s)",
    )
    parser.add_argument(
        "--max-yaw",
        type=float,
        default=d.max_yaw,
        help="drop clips whose 90th-percentile |yaw| exceeds this, degrees (default %(default)s)",
    )
    parser.add_argument(
        "--blur-threshold",
        type=float,
        default=d.blur_threshold,
        help="drop clips whose median variance of Laplacian (face centre, output scale) is "
        "below this (default %(default)s)",
    )
    parser.add_argument(
        "--identity-from",
        choices=("file", "parent"),
        default=d.identity_from,
        help="identity of a video: its file name or its folder's name (default %(default)s)",
    )
    parser.add_argument(
        "--identity-map",
        type=Path,
        default=None,
        help="file of 'name<TAB>identity' lines (name: file name, stem or path) that overrides "
        "--identity-from",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="read only the first N seconds of each video",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Run the pipeline with parsed arguments; returns the exit code: 0 when clips were kept
    (also when some inputs were skipped: the report says which and why), 1 when none were."""
    # Imported here so that building the ``livehead`` parser does not load OpenCV.
    from training.realdata.prepare import prepare_videos

    opts = PrepareOptions(
        min_face=args.min_face,
        size=args.size,
        clip_seconds=args.clip_seconds,
        min_clip_seconds=args.min_clip_seconds,
        clips_per_identity=args.clips_per_identity,
        max_yaw=args.max_yaw,
        blur_threshold=args.blur_threshold,
        identity_from=args.identity_from,
        identity_map=args.identity_map,
        max_seconds=args.max_seconds,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    manifest = prepare_videos(list(args.inputs), args.out, opts)
    if not args.quiet:
        print(f"wrote {args.out / 'manifest.jsonl'} and {args.out / 'report.json'}")
    if not manifest.clips:
        # Not an exception: the report is written and worth reading; but scripts should notice.
        print(
            f"livehead: no clips kept; see {args.out / 'report.json'} for why (small videos "
            "need a lower --min-face, soft ones a lower --blur-threshold)",
            file=sys.stderr,
        )
        return 1
    return 0
