"""Per-module speed of the networks, on this machine, with random weights.

    python -m engine.bench_modules stage1 --config tiny --batch 4 --threads 2 --json

Times the stage-1 encoder (one avatar image, and a batch of driving frames) and the renderer (a
window of ``--batch`` frames against one cached source pyramid) for each variant: fp32 or bf16
autocast, NCHW or channels_last. Prints one JSON object (``--json``) or a table. Speed does not
depend on the weights, so no checkpoint is needed.

bf16 + channels_last at 256² has crashed torch's CPU kernels on these machines (ENVIRONMENT.md),
so every variant runs in its own child process: a crash is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.config import load_config, to_dict

VARIANTS = ("fp32", "bf16", "fp32-cl", "bf16-cl")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("module", choices=["stage1"], help="which networks to time")
    p.add_argument("--config", default="tiny", help="config name or .toml path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--batch", type=int, default=4, help="frames per renderer call")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant-child", default="", help=argparse.SUPPRESS)


def _time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Wall-clock median and best, and the median process CPU time (all threads, spin-waits
    included). On a shared machine the wall clock includes waiting for a core; with one thread
    the CPU time does not, so it is the steadier number to compare implementations by."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "cpu_ms": statistics.median(cpu),
    }


def _bench_stage1_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    from engine.models.stage1 import Stage1Model

    cfg = load_config(args.config, args.set)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s1 = cfg.stage1
    model = Stage1Model(s1).eval()
    model.lmd.freeze()
    bf16 = variant.startswith("bf16")
    fmt = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    size, b = s1.image_size, args.batch
    src = torch.rand(1, 3, size, size).mul(2).sub(1).contiguous(memory_format=fmt)
    drv = torch.rand(b, 3, size, size).mul(2).sub(1).contiguous(memory_format=fmt)
    alpha = torch.randn(b, s1.motion_dim)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), amp:
        h, feats = model.encode(src)
        enc1 = _time_ms(lambda: model.encode(src), args.warmup, args.repeats)
        encb = _time_ms(lambda: model.motion(model.encode(drv)[0]), args.warmup, args.repeats)
        ren = _time_ms(lambda: model.render(h, feats, alpha), args.warmup, args.repeats)
        out = model.render(h, feats, alpha)
    return {
        "variant": variant,
        "encoder_avatar_ms": enc1["median_ms"],
        "encoder_motion_ms_per_frame": encb["median_ms"] / b,
        "render_batch_ms": ren["median_ms"],
        "render_ms_per_frame": ren["median_ms"] / b,
        "render_fps": 1000.0 * b / ren["median_ms"],
        "render_fps_best": 1000.0 * b / ren["min_ms"],
        "render_cpu_ms_per_frame": ren["cpu_ms"] / b,
        "encoder_avatar_cpu_ms": enc1["cpu_ms"],
        "output_finite": bool(torch.isfinite(out).all()),
    }


def _param_counts(args: argparse.Namespace) -> dict[str, int]:
    from engine.models.stage1 import CLUB, Stage1Model

    s1 = load_config(args.config, args.set).stage1
    counts = Stage1Model(s1).param_counts()
    counts["club"] = sum(p.numel() for p in CLUB(s1.latent_dim, s1.club_hidden).parameters())
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (see ``add_args``); print and return the result."""
    if args.variant_child:
        res = _bench_stage1_variant(args, args.variant_child)
        print(json.dumps(res))
        return res
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant '{v}' (choose from {', '.join(VARIANTS)})")
    cfg = load_config(args.config, args.set)
    result: dict[str, Any] = {
        "module": args.module,
        "config": cfg.name,
        "stage1": to_dict(cfg.stage1),
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "params": _param_counts(args),
        "variants": [],
    }
    base = [sys.executable, "-m", "engine.bench_modules", args.module, "--config", args.config]
    for s in args.set:
        base += ["--set", s]
    base += [
        f"--batch={args.batch}",
        f"--threads={args.threads}",
        f"--repeats={args.repeats}",
        f"--warmup={args.warmup}",
    ]
    for v in variants:
        proc = subprocess.run(base + [f"--variant-child={v}"], capture_output=True, text=True)
        if proc.returncode == 0:
            result["variants"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            result["variants"].append(
                {"variant": v, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
            )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.module} config={cfg.name} batch={args.batch} threads={args.threads}")
        print(f"params: {result['params']}")
        for r in result["variants"]:
            if "error" in r:
                print(f"  {r['variant']:8s} ERROR {r['error']}")
                continue
            print(
                f"  {r['variant']:8s} render {r['render_ms_per_frame']:7.2f} ms/frame "
                f"({r['render_fps']:6.1f} fps, best {r['render_fps_best']:6.1f})  "
                f"encoder avatar {r['encoder_avatar_ms']:7.2f} ms  "
                f"encoder+motion {r['encoder_motion_ms_per_frame']:7.2f} ms/frame"
            )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.bench_modules", description=__doc__)
    add_args(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
