"""Training and evaluation commands: ``livehead train {stage1,stage2,probe}``,
``livehead eval {stage1,stage2}``."""

from __future__ import annotations

import argparse


def _run(module: str):
    def go(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module).run(args) or 0)

    return go


def _doc(module) -> str:
    return (module.__doc__ or "").split("\n\n")[0]


def register(sub: argparse._SubParsersAction) -> None:
    from training import eval_stage1, eval_stage2, probe, stage1, stage2

    train = sub.add_parser("train", help="train a stage (stage1, stage2) or the eval probe")
    tsub = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = tsub.add_parser(
        "stage1",
        help="train the motion representation (encoder, LMD, renderer)",
        description=_doc(stage1),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stage1.add_args(p)
    p.set_defaults(func=_run("training.stage1"))
    p = tsub.add_parser(
        "stage2",
        help="train the audio-driven motion generator (needs stage-1 weights)",
        description=_doc(stage2),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stage2.add_args(p)
    p.set_defaults(func=_run("training.stage2"))
    p = tsub.add_parser(
        "probe",
        help="train the independent judge used by 'livehead eval stage2'",
        description=_doc(probe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_args(p)
    p.set_defaults(func=_run("training.probe"))

    ev = sub.add_parser("eval", help="evaluate a trained stage and print metrics")
    esub = ev.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = esub.add_parser(
        "stage1",
        help="self/cross reenactment PSNR/SSIM, identity leakage, real-video PSNR",
        description=_doc(eval_stage1),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_stage1.add_args(p)
    p.set_defaults(func=_run("training.eval_stage1"))
    p = esub.add_parser(
        "stage2",
        help="lip-sync r, A/V offset, pose control error, diversity, long-run drift",
        description=_doc(eval_stage2),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_stage2.add_args(p)
    p.set_defaults(func=_run("training.eval_stage2"))
