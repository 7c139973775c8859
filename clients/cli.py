"""``livehead client``: Python clients that speak only the wire protocol.

    livehead client mic   --url http://127.0.0.1:8080 [--file A.wav] [--record out.mp4]
    livehead client push  --url ws://127.0.0.1:8080/ws --audio A.wav --out O.mp4 [--clear-at 2]
    livehead client bench --url ws://127.0.0.1:8080/ws --audio A.wav --json [--plot lat.png]

Errors the user can fix exit with one line (status 2), like the rest of ``livehead``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "client",
        help="Python clients: microphone, PCM push, benchmark",
        description="Clients for a running `livehead serve`.",
    )
    sub = p.add_subparsers(dest="client_command", metavar="CLIENT", required=True)

    def common(q: argparse.ArgumentParser, default_url: str) -> None:
        q.add_argument("--url", default=default_url, help=f"server URL (default {default_url})")
        q.add_argument("--token", help="bearer token (default: $LIVEHEAD_TOKEN)")
        q.add_argument("--room", default=None, help="room name (default: the server's default)")
        q.add_argument(
            "--ice-address",
            action="append",
            default=[],
            metavar="IP",
            help="offer only this host address for ICE (repeatable); 127.0.0.1 for "
            "a server on this machine with no other interface",
        )

    q = sub.add_parser(
        "mic", help="stream the microphone (or a file) over WebRTC, show/record the avatar"
    )
    common(q, "http://127.0.0.1:8080")
    q.add_argument("--file", help="send this audio file at real-time pace instead of the mic")
    q.add_argument("--device", help="input device name or index (sounddevice)")
    q.add_argument("--record", help="write the returned avatar (video + audio) to this MP4")
    q.add_argument(
        "--seconds",
        type=float,
        help="stop after this long (default: file length + 1.5 s, or until Ctrl-C for the mic)",
    )
    q.set_defaults(func=_run_mic)

    q = sub.add_parser("push", help="push a file over the WebSocket API and record the result")
    common(q, "ws://127.0.0.1:8080/ws")
    q.add_argument("--audio", required=True, help="audio file to push (any format PyAV reads)")
    q.add_argument("--out", help="MP4 to write (synchronized audio + video)")
    q.add_argument(
        "--clear-at",
        type=float,
        metavar="SECONDS",
        help="send 'clear' (barge-in) this many seconds after the start",
    )
    q.set_defaults(func=_run_push)

    q = sub.add_parser(
        "bench", help="measure first frame, latency, fps, jitter, A/V offset, drops over the wire"
    )
    common(q, "ws://127.0.0.1:8080/ws")
    q.add_argument("--audio", required=True, help="speech file to send")
    q.add_argument("--seconds", type=float, help="use only the first SECONDS of the file")
    q.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (default: also "
        "one JSON object; the flag is accepted for scripts)",
    )
    q.add_argument("--plot", help="write a latency-over-time PNG here")
    q.set_defaults(func=_run_bench)


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("LIVEHEAD_TOKEN") or None


def _run(coro: Any) -> Any:
    from clients.media import ClientError

    try:
        return asyncio.run(coro)
    except ClientError as e:
        print(f"livehead: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_push(args: argparse.Namespace) -> int:
    from clients.ws import push_file

    summary = _run(
        push_file(args.url, args.audio, args.out, _token(args), args.room, args.clear_at)
    )
    print(json.dumps(summary))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from clients.bench import bench

    report = _run(
        bench(
            args.url, args.audio, _token(args), args.room, args.ice_address, args.seconds, args.plot
        )
    )
    print(json.dumps(report))
    return 0


def _run_mic(args: argparse.Namespace) -> int:
    print(json.dumps(_run(mic(args))))
    return 0


async def mic(args: argparse.Namespace) -> dict:
    """Publish the microphone (or a file), receive the avatar, optionally record it."""
    from clients.media import MicrophoneTrack, Mp4Recorder, PacedPcmTrack, load_audio
    from clients.rtc import AvRecording, RtcOptions, connect, recv_audio, recv_video

    track: MicrophoneTrack | PacedPcmTrack
    if args.file:
        track = PacedPcmTrack(load_audio(args.file, 48000), 48000)
        seconds = args.seconds or track.duration_s + 1.5
    else:
        device = int(args.device) if args.device and args.device.isdigit() else args.device
        track = MicrophoneTrack(device)
        seconds = args.seconds
    conn = await connect(
        RtcOptions(
            args.url, "presenter", args.room or "default", _token(args), True, args.ice_address
        ),
        track,
    )
    recorder = AvRecording(Mp4Recorder(args.record, 48000), conn.clocks) if args.record else None
    counts = {"video": 0, "audio": 0}

    async def read_video() -> None:
        while True:
            f = await recv_video(conn.video)
            counts["video"] += 1
            if recorder is not None:
                recorder.video(int(f.pts or 0), f.to_ndarray(format="rgb24"))

    async def read_audio() -> None:
        assert conn.audio is not None
        while True:
            pts, pcm = await recv_audio(conn.audio)
            counts["audio"] += 1
            if recorder is not None:
                recorder.audio(pts, pcm)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]
    try:
        if seconds:
            await asyncio.sleep(seconds)
        else:
            print("streaming the microphone; Ctrl-C to stop", file=sys.stderr)
            await asyncio.Event().wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        track.stop()
        await conn.close()
        if recorder is not None:
            recorder.close()
    elapsed = time.monotonic() - t0
    return {
        "seconds": round(elapsed, 2),
        "video_frames": counts["video"],
        "audio_frames": counts["audio"],
        "fps": round(counts["video"] / elapsed, 2),
        "record": args.record,
    }
