"""Training and evaluation commands: ``livehead train {stage1,stage2,reader,fast,probe,average}``,
``livehead eval {stage1,stage2}``."""

from __future__ import annotations

import argparse
import importlib

# (group, name, module, one-line help); each module has add_args(parser) and run(args).
COMMANDS = [
    (
        "train",
        "stage1",
        "training.stage1",
        "train the motion representation (encoder, LMD, renderer)",
    ),
    (
        "train",
        "stage2",
        "training.stage2",
        "train the audio-driven motion generator (needs stage-1 weights)",
    ),
    (
        "train",
        "reader",
        "training.reader",
        "train stage 1's head reader (video-driven reenactment; synthetic world)",
    ),
    (
        "train",
        "fast",
        "training.fast_head",
        "train stage 1's draft exit (a cheaper render for live windows that would be late)",
    ),
    ("train", "probe", "training.probe", "train the independent judge used by 'eval stage2'"),
    (
        "train",
        "average",
        "training.average",
        "average weight files of one run (checkpoint averaging)",
    ),
    (
        "eval",
        "stage1",
        "training.eval_stage1",
        "self/cross reenactment PSNR/SSIM, identity leakage, real-video PSNR",
    ),
    (
        "eval",
        "stage2",
        "training.eval_stage2",
        "lip-sync r, A/V offset, pose control error, diversity, long-run drift",
    ),
]
GROUPS = {
    "train": "train a stage (stage1, stage2) or the eval probe",
    "eval": "evaluate a trained stage and print metrics",
}


def _runner(module: str):
    def go(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args) or 0)

    return go


def register(sub: argparse._SubParsersAction) -> None:
    groups = {}
    for name, text in GROUPS.items():
        g = sub.add_parser(name, help=text)
        groups[name] = g.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for group, name, module, text in COMMANDS:
        mod = importlib.import_module(module)
        p = groups[group].add_parser(
            name,
            help=text,
            description=(mod.__doc__ or "").split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(func=_runner(module))
