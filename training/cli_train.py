"""Training and evaluation commands: ``livehead train {stage1,stage2}``, ``livehead eval ...``."""

from __future__ import annotations

import argparse


def _run(module: str):
    def go(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module).run(args) or 0)

    return go


def register(sub: argparse._SubParsersAction) -> None:
    from training import eval_stage1, stage1

    train = sub.add_parser("train", help="train a stage (stage1, stage2)")
    tsub = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = tsub.add_parser(
        "stage1",
        help="train the motion representation (encoder, LMD, renderer)",
        description=(stage1.__doc__ or "").split("\n\n")[0],
    )
    stage1.add_args(p)
    p.set_defaults(func=_run("training.stage1"))

    ev = sub.add_parser("eval", help="evaluate a trained stage and print metrics")
    esub = ev.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = esub.add_parser(
        "stage1",
        help="self/cross reenactment PSNR/SSIM, identity leakage, real-video PSNR",
        description=(eval_stage1.__doc__ or "").split("\n\n")[0],
    )
    eval_stage1.add_args(p)
    p.set_defaults(func=_run("training.eval_stage1"))
