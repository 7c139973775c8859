"""Client-side media: audio files, real-time paced sources, the microphone, MP4 recording."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack


class ClientError(Exception):
    """A problem the user can fix (bad file, unreachable server, refused request)."""


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Any audio file PyAV reads -> (N,) int16 mono at ``sample_rate``."""
    p = Path(path)
    if not p.is_file():
        raise ClientError(f"audio file '{p}' not found")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError) as e:
        raise ClientError(f"cannot read audio file '{p}': {e}") from None
    with container:
        if not container.streams.audio:
            raise ClientError(f"'{p}' has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(audio=0):
            frame.pts = None
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    if not chunks:
        raise ClientError(f"'{p}' contains no audio samples")
    return np.concatenate(chunks).astype(np.int16)


class PacedPcmTrack(MediaStreamTrack):
    """An aiortc audio track that plays int16 mono PCM at real-time pace in 20 ms frames, then
    silence (a live microphone never stops sending). ``sent`` records (sample index, wall time)
    of every frame of the file, for latency measurement.

    aiortc sends a frame the moment recv() returns, so recv() sleeps until the frame's time."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray, sample_rate: int = 48000) -> None:
        super().__init__()
        self.pcm = np.asarray(pcm, dtype=np.int16)
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self.sent: list[tuple[int, float]] = []  # (first sample index, time.monotonic())
        self.t_start: float | None = None
        self.done = asyncio.Event()
        self._n = 0

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t_start is None:
            self.t_start = time.monotonic()
        due = self.t_start + self._n * self.frame_samples / self.sample_rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        start = self._n * self.frame_samples
        chunk = self.pcm[start : start + self.frame_samples]
        if len(chunk):
            self.sent.append((start, time.monotonic()))
        else:
            self.done.set()
        if len(chunk) < self.frame_samples:
            chunk = np.pad(chunk, (0, self.frame_samples - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = start
        frame.time_base = fractions.Fraction(1, self.sample_rate)
        self._n += 1
        return frame


class MicrophoneTrack(MediaStreamTrack):
    """The default (or chosen) input device via sounddevice, as 20 ms 48 kHz mono frames."""

    kind = "audio"

    def __init__(self, device: str | int | None = None, sample_rate: int = 48000) -> None:
        super().__init__()
        try:
            import sounddevice as sd
        except (ImportError, OSError) as e:
            raise ClientError(
                f"microphone input needs sounddevice and PortAudio ({e}); or pass --file"
            ) from None
        self.sample_rate = sample_rate
        self._event_loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=50)
        self._n = 0

        def callback(indata: np.ndarray, frames: int, t: object, status: object) -> None:
            # PortAudio's thread: hand a copy to the event loop, never block here.
            self._event_loop.call_soon_threadsafe(self._offer, indata[:, 0].copy())

        try:
            self._stream = sd.InputStream(
                samplerate=sample_rate,
                channels=1,
                dtype="int16",
                blocksize=sample_rate // 50,
                device=device,
                callback=callback,
            )
            self._stream.start()
        except Exception as e:  # PortAudioError, ValueError (no such device)
            raise ClientError(
                f"cannot open the microphone ({e}); list devices with "
                "`python -m sounddevice`, or pass --file"
            ) from None

    def _offer(self, block: np.ndarray) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # the sender fell behind: keep the newest audio
        self._queue.put_nowait(block)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        block = await self._queue.get()
        frame = av.AudioFrame.from_ndarray(block[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._n
        frame.time_base = fractions.Fraction(1, self.sample_rate)
        self._n += len(block)
        return frame

    def stop(self) -> None:
        super().stop()
        self._stream.stop()
        self._stream.close()


class Mp4Recorder:
    """Writes received video (RGB arrays at given times) and audio (contiguous int16 PCM) to
    an MP4 (H.264 + AAC). Video times and audio sample counts share one origin (the first
    frame of the stream), so the file plays in sync exactly when the stream was in sync."""

    def __init__(
        self, path: str | Path, audio_rate: int, audio_channels: int = 1, fps: int = 25
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._audio_rate = audio_rate
        self._astream = self._container.add_stream("aac", rate=audio_rate)
        self._astream.layout = "mono" if audio_channels == 1 else "stereo"
        self._achannels = audio_channels
        self._resampler = av.AudioResampler(
            format="fltp", layout=self._astream.layout.name, rate=audio_rate, frame_size=1024
        )
        self._vstream: av.VideoStream | None = None
        # Nothing is muxed before the video stream exists: the container's header is written
        # at the first mux, and a stream added after it is never set up (libavformat then
        # divides by its zero time base: SIGFPE). Audio that comes first waits here.
        self._pending_audio: list[np.ndarray] = []
        self._fps = fps
        self._last_vpts = -1
        self._audio_samples = 0
        self.video_frames = 0

    def video(self, rgb: np.ndarray, t_s: float) -> None:
        """rgb: (H, W, 3) uint8 shown from ``t_s`` seconds after the stream origin."""
        h, w = rgb.shape[:2]
        if self._vstream is None:
            s = self._container.add_stream("libx264", rate=self._fps)
            s.width, s.height = w - w % 2, h - h % 2
            s.pix_fmt = "yuv420p"
            s.time_base = fractions.Fraction(1, 90000)
            s.codec_context.time_base = fractions.Fraction(1, 90000)
            s.options = {"preset": "veryfast", "tune": "zerolatency"}
            self._vstream = s
            pending, self._pending_audio = self._pending_audio, []
            for pcm in pending:
                self._write_audio(pcm)
        pts = int(round(t_s * 90000))
        if pts <= self._last_vpts:
            return  # repeated or reordered timestamp: keep the stream monotonic
        self._last_vpts = pts
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(rgb[: self._vstream.height, : self._vstream.width]), format="rgb24"
        )
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, 90000)
        for packet in self._vstream.encode(frame):
            self._container.mux(packet)
        self.video_frames += 1

    def audio(self, pcm: np.ndarray) -> None:
        """pcm: (N,) or (N, C) int16, appended to the audio timeline."""
        pcm = np.array(pcm, dtype=np.int16)  # a copy: pending audio must not change
        if self._vstream is None:
            self._pending_audio.append(pcm)
        else:
            self._write_audio(pcm)

    def _write_audio(self, pcm: np.ndarray) -> None:
        if pcm.ndim == 1:
            pcm = pcm[:, None]
        if pcm.shape[1] != self._achannels:
            pcm = (
                pcm.mean(axis=1, keepdims=True).astype(np.int16)
                if self._achannels == 1
                else np.repeat(pcm[:, :1], self._achannels, axis=1)
            )
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout=self._astream.layout.name
        )
        frame.sample_rate = self._audio_rate
        frame.pts = None
        self._encode_audio(self._resampler.resample(frame))

    def _encode_audio(self, frames: list[av.AudioFrame]) -> None:
        for f in frames:
            f.pts = self._audio_samples
            f.time_base = fractions.Fraction(1, self._audio_rate)
            self._audio_samples += f.samples
            for packet in self._astream.encode(f):
                self._container.mux(packet)

    def close(self) -> None:
        for pcm in self._pending_audio:  # no video came at all: an audio-only file
            self._write_audio(pcm)
        self._pending_audio = []
        self._encode_audio(self._resampler.resample(None))
        for packet in self._astream.encode(None):
            self._container.mux(packet)
        if self._vstream is not None:
            for packet in self._vstream.encode(None):
                self._container.mux(packet)
        self._container.close()


def paced(interval_s: float) -> Callable[[int], float]:
    """Deadline function for item n of a real-time stream that started now."""
    t0 = time.monotonic()
    return lambda n: t0 + n * interval_s
