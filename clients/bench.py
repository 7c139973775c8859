"""``livehead client bench``: what a viewer gets, measured over the wire.

Two transports, one report:
- ``ws://.../ws``: every frame carries its pts and the number of our samples played through it,
  so end-to-end latency (audio sent -> the frame whose pts covers it received) is exact.
- ``http://...``: WebRTC as a presenter (publishes the file, receives what every viewer
  receives). RTP carries no such counter, so the returned audio is aligned to the sent audio by
  cross-correlation (the avatar returns the input speech, delayed); a video frame's audio
  position comes from its pts (the server starts both tracks on the same pts).

Latency figures are p50/p95/p99 in milliseconds, as STREAMING.md asks.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.media import ClientError, PacedPcmTrack, load_audio
from clients.rtc import RtcOptions, connect, recv_audio, recv_video
from clients.ws import PUSH_RATE, run_push

FRAME_S = 0.04
RTC_RATE = 48000


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    return {
        "p50": round(float(np.percentile(v, 50)), 1),
        "p95": round(float(np.percentile(v, 95)), 1),
        "p99": round(float(np.percentile(v, 99)), 1),
        "n": int(len(v)),
    }


def media_fps(pts: np.ndarray, clock_hz: float) -> float | None:
    """The stream's own frame rate: its clock over the median pts step (a dropped frame or a late
    arrival does not change it; ``fps``, from arrival times, is what this machine kept up)."""
    d = np.diff(np.asarray(pts, dtype=np.float64))
    d = d[d > 0]
    return round(float(clock_hz / np.median(d)), 2) if len(d) else None


def timing(arrivals: list[float]) -> dict[str, Any]:
    """fps and jitter from frame arrival times (seconds)."""
    t = np.asarray(arrivals)
    if len(t) < 2:
        return {"fps": 0.0, "jitter_ms": None, "interval_ms": percentiles([])}
    d = np.diff(t) * 1000
    return {
        "fps": round((len(t) - 1) / (t[-1] - t[0]), 2),
        "jitter_ms": round(float(np.std(d)), 2),
        "interval_ms": percentiles(d),
    }


async def bench_ws(url: str, pcm16: np.ndarray, token: str | None, room: str | None) -> dict:
    t_begin = time.monotonic()
    run = await run_push(url, pcm16, token=token, room=room, tail_s=0.3)
    if not run.frames:
        raise ClientError("no frames received")
    arrivals = [t for t, _ in run.frames]
    frames = [f for _, f in run.frames]
    sent_counts = np.array([n for n, _ in run.sent])
    sent_times = np.array([t for _, t in run.sent])
    latency, t_lat, prev = [], [], 0
    for t, f in run.frames:
        if f.played_samples > prev:
            # The last of our samples this frame covers was sent in the chunk that took the
            # cumulative count past it.
            i = int(np.searchsorted(sent_counts, f.played_samples))
            if i < len(sent_times):
                latency.append((t - sent_times[i]) * 1000)
                t_lat.append(t - t_begin)
        prev = f.played_samples
    pts = np.array([f.pts_samples for f in frames])
    gaps = int(np.sum(np.maximum(0, np.diff(pts) // 640 - 1))) if len(pts) > 1 else 0
    return {
        "transport": "websocket",
        "first_frame_s": round(arrivals[0] - t_begin, 3),
        "frames": len(frames),
        **timing(arrivals),
        "media_fps": media_fps(pts, frames[-1].sample_rate),
        "latency_ms": percentiles(latency),
        "av_offset_ms": {"p50": 0.0, "p95": 0.0, "p99": 0.0, "n": len(frames)},
        "dropped_frames": gaps + sum(1 for f in frames if f.jpeg is None),
        "played_samples": frames[-1].played_samples,
        "sent_samples": int(len(pcm16)),
        "size": [frames[-1].width, frames[-1].height],
        "_latency_series": (t_lat, latency),
    }


def _envelope_lag(sent: np.ndarray, received: np.ndarray, rate: int) -> tuple[int, float]:
    """Lag L (samples) with received[j] ~ sent[j - L], and the normalised peak (0..1).

    L may be negative: ``received`` starts at the first packet that came back, and a server
    whose output begins with audio sent a little after the client started (its first
    milliseconds of input went before the session was up) returns sent[-L] first.
    Coarse search on 10 ms energy envelopes (robust to Opus and resampling), refined on the
    waveform within +-10 ms."""
    hop = rate // 100

    def env(x: np.ndarray) -> np.ndarray:
        n = len(x) // hop
        e = np.sqrt(np.mean(np.square(x[: n * hop].reshape(n, hop), dtype=np.float64), axis=1))
        return e - e.mean()

    es, er = env(sent.astype(np.float64)), env(received.astype(np.float64))
    if len(es) < 10 or len(er) < len(es) // 2:
        raise ClientError("too little audio came back to align it with what was sent")
    n = 1 << int(np.ceil(np.log2(len(es) + len(er))))
    xc = np.fft.irfft(np.fft.rfft(er, n) * np.conj(np.fft.rfft(es, n)), n)
    # xc[k] = sum_j er[j + k] es[j]: lags 0 .. len(er)-1 at the front, negative ones wrapped
    lags = np.concatenate([np.arange(-(len(es) - 1), 0), np.arange(len(er))])
    xc = np.concatenate([xc[n - len(es) + 1 :], xc[: len(er)]])
    i = int(np.argmax(xc))
    coarse = int(lags[i]) * hop
    peak = float(xc[i] / (np.linalg.norm(es) * np.linalg.norm(er) + 1e-9))
    best, best_v = coarse, -np.inf
    s = sent.astype(np.float64)
    r = received.astype(np.float64)
    for lag in range(coarse - hop, coarse + hop + 1, 4):
        r0, s0 = max(0, lag), max(0, -lag)  # received[r0 + j] ~ sent[s0 + j]
        m = min(len(s) - s0, len(r) - r0)
        if m <= 0:
            continue
        v = float(np.dot(r[r0 : r0 + m], s[s0 : s0 + m]))
        if v > best_v:
            best, best_v = lag, v
    return best, peak


async def bench_webrtc(
    url: str,
    pcm48: np.ndarray,
    token: str | None,
    room: str | None,
    ice_addresses: list[str],
    tail_s: float = 1.5,
) -> dict:
    track = PacedPcmTrack(pcm48, RTC_RATE)
    t_begin = time.monotonic()
    conn = await connect(
        RtcOptions(url, "presenter", room or "default", token, True, ice_addresses), track
    )
    video: list[tuple[float, int]] = []
    audio: list[tuple[float, int, np.ndarray]] = []

    async def read_video() -> None:
        while True:
            f = await recv_video(conn.video)
            video.append((time.monotonic(), int(f.pts or 0)))

    async def read_audio() -> None:
        assert conn.audio is not None
        while True:
            pts, x = await recv_audio(conn.audio)
            audio.append((time.monotonic(), pts, x.astype(np.float32)))

    tasks = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]
    try:
        await asyncio.wait_for(track.done.wait(), track.duration_s + 30)
        await asyncio.sleep(tail_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()
    if not video or not audio:
        raise ClientError("no video or audio came back")
    vclock, aclock = conn.clocks["video"], conn.clocks["audio"]
    synced = vclock.ready and aclock.ready
    a0 = audio[0][1]
    a_pos = np.array([p - a0 for _, p, _ in audio])  # RTP Opus clock is 48 kHz

    def audio_index(video_pts: int, plus_s: float = 0.0) -> int | None:
        """Index into ``received`` of the audio with the media time of a video pts."""
        if synced:  # RTCP sender reports: equal sender times are equal media times
            t = vclock.sender_time(video_pts)
            p = aclock.pts_at(t + plus_s) if t is not None else None
            return None if p is None else int(round(p)) - a0
        # Fallback: the server starts both tracks on one pts (exact unless packets were lost).
        return int(round(((video_pts - video[0][1]) / 90000 + plus_s) * RTC_RATE))

    received = np.zeros(int(a_pos[-1]) + len(audio[-1][2]), np.float32)
    for (_, _, x), pos in zip(audio, a_pos):
        received[pos : pos + len(x)] = x
    a_arrival = np.array([t for t, _, _ in audio])
    try:
        lag: int | None
        lag, confidence = _envelope_lag(pcm48, received, RTC_RATE)
        unaligned = None
    except ClientError as e:
        # A server that cannot keep up drops live input (it says so in its log): the rest of
        # the report still stands, the latency figures need the alignment.
        lag, confidence, unaligned = None, 0.0, str(e)
    sent_idx = np.array([i for i, _ in track.sent])
    sent_t = np.array([t for _, t in track.sent])

    def t_sent(sample: int) -> float | None:
        if lag is None:
            return None
        sample -= lag
        if sample < 0 or sample >= len(pcm48):
            return None
        i = int(np.searchsorted(sent_idx, sample, "right")) - 1
        return float(sent_t[min(len(sent_t) - 1, i)])

    latency, t_lat, av_offset, transit = [], [], [], []
    unix_minus_mono = time.time() - time.monotonic()
    for t, pts in video:
        start, end = audio_index(pts), audio_index(pts, FRAME_S)
        if start is None or end is None:
            continue
        ts = t_sent(end - 1)  # the last sent sample this frame covers
        if ts is not None:
            latency.append((t - ts) * 1000)
            t_lat.append(t - t_begin)
        k = int(np.searchsorted(a_pos, start, "right") - 1)
        if 0 <= k < len(audio):
            av_offset.append((t - a_arrival[k]) * 1000)
        sent_at = vclock.sender_time(pts)
        if sent_at is not None:
            transit.append((t + unix_minus_mono - sent_at) * 1000)
    audio_latency = [
        (t - ts) * 1000
        for (t, _, x), pos in zip(audio, a_pos)
        if (ts := t_sent(int(pos) + len(x) - 1)) is not None
    ]
    vpts = np.array([p for _, p in video])
    gaps = int(np.sum(np.maximum(0, np.round(np.diff(vpts) / 3600) - 1))) if len(vpts) > 1 else 0
    return {
        "transport": "webrtc",
        "first_frame_s": round(video[0][0] - t_begin, 3),
        "frames": len(video),
        **timing([t for t, _ in video]),
        "media_fps": media_fps(vpts, 90000),
        "latency_ms": percentiles(latency),
        "audio_latency_ms": percentiles(audio_latency),
        "av_offset_ms": percentiles(av_offset),
        # Arrival minus the sender report's time for the frame's pts: for a livehead server the
        # room's media timeline, so stalls since its first frame count too.
        "transit_ms": percentiles(transit),
        "dropped_frames": gaps,
        "alignment": {
            "lag_ms": None if lag is None else round(lag * 1000 / RTC_RATE, 1),
            "confidence": round(confidence, 3),
            "av_method": "rtcp-sender-reports" if synced else "first-frame",
            **({"error": unaligned} if unaligned else {}),
        },
        "returned_audio_s": round(len(received) / RTC_RATE, 2),
        "_latency_series": (t_lat, latency),
    }


def plot_latency(series: tuple[list[float], list[float]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, lat = series
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, lat, ".", ms=3)
    if lat:
        ax.axhline(float(np.median(lat)), color="k", lw=0.8, label=f"p50 {np.median(lat):.0f} ms")
        ax.legend(loc="upper right")
    ax.set_xlabel("time since connect (s)")
    ax.set_ylabel("audio sent -> frame received (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def bench(
    url: str,
    audio: str | Path,
    token: str | None = None,
    room: str | None = None,
    ice_addresses: list[str] | None = None,
    seconds: float | None = None,
    plot: str | Path | None = None,
) -> dict:
    """Run one measurement; returns the report (``_latency_series`` removed)."""
    if url.startswith(("ws://", "wss://")):
        pcm = load_audio(audio, PUSH_RATE)
        if seconds:
            pcm = pcm[: int(seconds * PUSH_RATE)]
        report = await bench_ws(url, pcm, token, room)
    elif url.startswith(("http://", "https://")):
        pcm = load_audio(audio, RTC_RATE)
        if seconds:
            pcm = pcm[: int(seconds * RTC_RATE)]
        report = await bench_webrtc(url, pcm, token, room, ice_addresses or [])
    else:
        raise ClientError(f"URL must start with ws:// (WebSocket) or http:// (WebRTC): {url}")
    series = report.pop("_latency_series")
    report["audio_s"] = round(len(pcm) / (PUSH_RATE if url.startswith("ws") else RTC_RATE), 2)
    if plot:
        plot_latency(series, plot, f"livehead {report['transport']} end-to-end latency")
        report["plot"] = str(plot)
    return report
