"""Streaming engine: streaming == offline bit for bit, A/V alignment, interrupt, isolation of
sessions, bad input, resampling, controls, bounded queues. Tiny random networks at 64²."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.errors import UserError
from engine.render import render_frames
from engine.session_api import SAMPLES_PER_FRAME, Controls, OutputFrame
from engine.stream import Engine, StreamSession, runtime_config
from engine.tensors import to_uint8
from engine.windowing import generate_offline, offline_features
from tests.small import SMALL_STAGE1, SMALL_STAGE2, small_models

SMALL = [*SMALL_STAGE1, *SMALL_STAGE2, "stage2.sample_steps=3"]
SEED = 7


def speechy(n: int, seed: int = 0) -> np.ndarray:
    """Noise bursts with pauses: loud and quiet frames, (n,) float32 16 kHz."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * 0.2
    env = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 1.5) > -0.3).astype(np.float32)
    return x * env


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    m1, nets, cfg = small_models()
    return Engine.from_models(m1, nets, cfg)


@pytest.fixture(scope="module")
def avatar(engine: Engine):
    rng = np.random.default_rng(1)
    return engine.prepare_avatar(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))


AUDIO = speechy(16000 * 2 + 300)  # 2 s and a partial frame


def stream(session: StreamSession, x: np.ndarray, chunks: list[int], rate: int = 16000):
    frames: list[OutputFrame] = []
    pos = 0
    for c in chunks:
        session.push_audio(x[pos : pos + c], rate)
        pos += c
        frames += session.pull()
    assert pos >= x.shape[0]
    session.finish()
    frames += session.pull()
    return frames


def sizes(total: int, step: int) -> list[int]:
    return [step] * (-(-total // step))


def offline_reference(engine: Engine, avatar, x: np.ndarray, seed: int):
    """α from windowing.generate_offline and frames rendered per window, straight from the
    networks: an independent path to compare the session against."""
    feats, n = offline_features(engine.frontend, x, engine.plan)
    w = engine.plan.window_frames
    n_all = engine.plan.num_windows(n) * w
    alpha = generate_offline(
        engine.stage2.nets,
        engine.plan,
        feats,
        avatar.ref_alpha,
        avatar.ref_h,
        n_all,
        seed=seed,
        steps=engine.cfg.stage2.sample_steps,
        schedule=engine.schedule,
        pad_row=engine.pad_row,
        noise_scale=engine.cfg.stage2.noise_scale,
    )
    model = engine.stage1.model
    with torch.no_grad():
        images = [
            to_uint8(model.render(avatar.h, avatar.feats, alpha[i : i + w]))
            for i in range(0, n_all, w)
        ]
    return alpha[:n].numpy(), np.concatenate(images)[:n]


@pytest.fixture(scope="module")
def reference(engine: Engine, avatar):
    return offline_reference(engine, avatar, AUDIO, SEED)


@pytest.mark.parametrize("chunking", ["10ms", "20ms", "333ms", "random", "whole"])
def test_streaming_equals_offline_bit_exact(engine, avatar, reference, chunking):
    n = AUDIO.shape[0]
    if chunking == "random":
        rng = np.random.default_rng(3)
        chunks = list(rng.integers(0, 3000, 200))
        chunks.append(n)  # whatever is left
    elif chunking == "whole":
        chunks = [n]
    else:
        chunks = sizes(n, {"10ms": 160, "20ms": 320, "333ms": 5328}[chunking])
    frames = stream(engine.session(avatar, seed=SEED), AUDIO, chunks)
    alpha, images = reference
    assert len(frames) == -(-n // SAMPLES_PER_FRAME) == alpha.shape[0]
    got_alpha = np.stack([f.meta["alpha"] for f in frames])
    assert np.array_equal(got_alpha, alpha)
    assert np.array_equal(np.stack([f.image for f in frames]), images)
    assert np.std(alpha, axis=0).max() > 0  # the motion actually moves


def test_offline_render_path_equals_streaming(engine, avatar, reference):
    alpha, images = reference
    frames = list(render_frames(engine, avatar, AUDIO, seed=SEED))
    assert np.array_equal(np.stack([f.meta["alpha"] for f in frames]), alpha)
    assert np.array_equal(np.stack([f.image for f in frames]), images)


def test_av_alignment_each_frame_carries_its_input(engine, avatar):
    frames = stream(engine.session(avatar, seed=1), AUDIO, sizes(AUDIO.shape[0], 777))
    padded = np.concatenate([AUDIO, np.zeros(SAMPLES_PER_FRAME, np.float32)])
    for k, f in enumerate(frames):
        assert f.pts_samples == k * SAMPLES_PER_FRAME
        assert f.audio.dtype == np.float32 and f.audio.shape == (SAMPLES_PER_FRAME,)
        assert np.array_equal(f.audio, padded[f.pts_samples : f.pts_samples + SAMPLES_PER_FRAME])
        assert f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8
        for key in ("features_ms", "encoder_ms", "denoiser_ms", "render_ms"):
            assert f.meta[key] >= 0
        assert f.meta["output_time"] >= f.meta["input_time"]
    speech = [f.speech for f in frames]
    assert any(speech) and not all(speech)  # the pauses are idle


def test_latency_and_first_window(engine, avatar):
    s = engine.session(avatar)
    plan = engine.plan
    assert s.latency_samples == (plan.window_frames + plan.lookahead_frames) * SAMPLES_PER_FRAME
    s.push_audio(AUDIO[: s.latency_samples - 1])
    assert s.pull() == []
    s.push_audio(AUDIO[s.latency_samples - 1 : s.latency_samples])
    assert len(s.pull()) == plan.window_frames


def test_interrupt_flushes_and_reports_played_position(engine, avatar):
    s = engine.session(avatar, seed=2)
    s.push_audio(AUDIO[:16000])
    played = s.pull()
    s.push_audio(AUDIO[16000:24000])  # rendered, never pulled
    assert s.queued_frames > 0
    emitted = s.interrupt()
    assert emitted == len(played) * SAMPLES_PER_FRAME
    assert s.queued_frames == 0 and s.pull() == []
    # The timeline continues at the played position; the dropped audio is gone for good.
    new = speechy(16000, seed=9)
    s.push_audio(new)
    after = s.pull()
    assert after and after[0].pts_samples == emitted
    for k, f in enumerate(after):
        assert f.pts_samples == emitted + k * SAMPLES_PER_FRAME
        assert np.array_equal(f.audio, new[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME])
    # Motion continues from the last α's shown: they are the new windows' known prefix.
    k = engine.plan.prefix_frames
    shown = np.stack([f.meta["alpha"] for f in played[-k:]])
    prefix = s._streamer.history.numpy()  # after the new windows: the newest K again
    assert prefix.shape[0] == k
    s2 = engine.session(avatar, seed=2)
    s2.push_audio(AUDIO[:16000])
    s2.pull()
    s2.push_audio(AUDIO[16000:20000])
    s2.interrupt()
    assert np.array_equal(s2._streamer.history.numpy(), shown)
    # A second interrupt right away reports the same position (nothing more was pulled).
    s.push_audio(new[:1000])
    assert s.interrupt() == emitted + len(after) * SAMPLES_PER_FRAME


def test_two_sessions_do_not_interfere(engine, avatar):
    other = speechy(AUDIO.shape[0], seed=5)
    alone_a = stream(engine.session(avatar, seed=SEED), AUDIO, sizes(AUDIO.shape[0], 640))
    alone_b = stream(engine.session(avatar, seed=3), other, sizes(other.shape[0], 1000))
    a, b = engine.session(avatar, seed=SEED), engine.session(avatar, seed=3)
    got_a: list[OutputFrame] = []
    got_b: list[OutputFrame] = []
    for i in range(0, AUDIO.shape[0], 500):
        a.push_audio(AUDIO[i : i + 500])
        b.push_audio(other[i : i + 500])
        got_b += b.pull()
        got_a += a.pull()
    for s, got in ((a, got_a), (b, got_b)):
        s.finish()
        got += s.pull()
    for alone, together in ((alone_a, got_a), (alone_b, got_b)):
        assert len(alone) == len(together)
        assert all(np.array_equal(x.image, y.image) for x, y in zip(alone, together))
        assert all(np.array_equal(x.audio, y.audio) for x, y in zip(alone, together))


def test_silence_gives_idle_frames(engine, avatar):
    s = engine.session(avatar)
    s.push_silence(16000)
    s.push_audio(np.zeros(8000, np.float32))
    s.push_audio(np.zeros(0, np.float32))  # an empty push is fine
    frames = s.pull()
    assert len(frames) >= 30
    assert not any(f.speech for f in frames)
    assert all(f.image.shape == (64, 64, 3) for f in frames)
    assert all(not np.any(f.audio) for f in frames)


def test_bad_input_is_a_user_error_and_other_sessions_go_on(engine, avatar):
    s = engine.session(avatar)
    good = engine.session(avatar)
    x = AUDIO[:1000].copy()
    nan = x.copy()
    nan[3] = np.nan
    inf = x.copy()
    inf[5] = np.inf
    for bad, rate in [
        (nan, 16000),
        (inf, 16000),
        (x.astype(np.int64), 16000),
        (x.tolist(), 16000),
        (x.reshape(10, 10, 10), 16000),
        (x, 0),
        (x, 16000.0),
        (np.zeros(16000 * 61, np.float32), 16000),
    ]:
        with pytest.raises(UserError):
            s.push_audio(bad, rate)  # type: ignore[arg-type]
    with pytest.raises(UserError):
        s.push_silence(-1)
    with pytest.raises(UserError):
        s.set_controls(Controls(pose_deg=(200.0, 0.0, 0.0)))
    with pytest.raises(UserError):
        s.set_avatar(np.zeros((10, 10), np.uint8))
    s.push_audio(AUDIO[:8000])  # still usable after refused input
    assert s.pull()
    s.close()
    with pytest.raises(UserError, match="closed"):
        s.push_audio(x)
    with pytest.raises(UserError, match="closed"):
        s.pull()
    good.push_audio(AUDIO[:8000])
    assert len(good.pull()) > 0


def test_int16_and_clipping(engine, avatar):
    pcm = (np.clip(AUDIO[:8000], -1, 1) * 32767).astype(np.int16)
    s = engine.session(avatar)
    s.push_audio(pcm)
    frames = s.pull()
    assert frames and np.allclose(frames[0].audio, pcm[:640] / 32768.0)
    loud = engine.session(avatar)
    loud.push_audio(np.full(8000, 3.0))  # float64, out of range: clipped, not refused
    assert np.all(loud.pull()[0].audio == 1.0)


def test_48k_stereo_input(engine, avatar):
    n48 = 48000 * 2
    t = np.arange(n48) / 48000
    mono = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    stereo = np.stack([mono, mono], axis=1)
    one = stream(engine.session(avatar), stereo, [n48], rate=48000)
    chunked = stream(engine.session(avatar), stereo, sizes(n48, 960), rate=48000)
    assert len(one) == len(chunked) == 50
    for a, b in zip(one, chunked):  # the resampler keeps state: chunking changes nothing
        assert np.array_equal(a.audio, b.audio) and np.array_equal(a.image, b.image)
    # The resampled audio is the 16 kHz version of the input (after the filter's delay).
    from scipy.signal import resample_poly

    ref = resample_poly(mono, 1, 3)
    got = np.concatenate([f.audio for f in one])[: ref.size]
    lag = int(np.argmax(np.correlate(got[2000:6000], ref[2000:5000], "valid")))
    assert lag < 40 and np.abs(got[2000 + lag : 30000] - ref[2000 : 30000 - lag]).max() < 0.05


def test_set_controls_changes_the_motion_from_the_next_window(engine, avatar):
    def run(change: bool) -> np.ndarray:
        s = engine.session(avatar, seed=4)
        s.push_audio(AUDIO[:16000])
        frames = s.pull()
        if change:
            s.set_controls(Controls(pose_deg=(40.0, -20.0, 10.0), location=0.3, scale=1.2))
        s.push_audio(AUDIO[16000:])
        frames += s.pull()
        return np.stack([f.meta["alpha"] for f in frames])

    base, changed = run(False), run(True)
    n_before = (engine.plan.windows_ready(16000)) * engine.plan.window_frames
    assert np.array_equal(base[:n_before], changed[:n_before])
    assert not np.array_equal(base[n_before:], changed[n_before:])


def test_controls_at_start_match_offline_track(engine, avatar):
    c = Controls(pose_deg=(10.0, 5.0, 0.0))
    a = stream(engine.session(avatar, seed=1, controls=c), AUDIO[:9000], [9000])
    b = stream(engine.session(avatar, seed=1), AUDIO[:9000], [9000])
    assert not np.array_equal(
        np.stack([f.meta["alpha"] for f in a]), np.stack([f.meta["alpha"] for f in b])
    )
    c2 = list(render_frames(engine, avatar, AUDIO[:9000], seed=1, controls=c))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, c2))


def test_set_avatar_applies_at_the_next_window(engine, avatar):
    s = engine.session(avatar, seed=0)
    s.push_audio(AUDIO[:8000])
    before = s.pull()
    other = np.full((64, 64, 3), 200, np.uint8)
    s.set_avatar(other)
    s.push_audio(AUDIO[8000:16000])
    after = s.pull()
    ref = engine.session(avatar, seed=0)
    ref.push_audio(AUDIO[:16000])
    same = ref.pull()
    assert all(np.array_equal(x.image, y.image) for x, y in zip(before, same))
    assert not np.array_equal(after[0].image, same[len(before)].image)


def test_consumer_that_does_not_pull_loses_video_not_audio(engine, avatar):
    cfg = load_config(
        "tiny",
        SMALL + ["stream.output_queue_frames=6", "stream.max_backlog_s=3", "stream.max_push_s=1"],
    )
    eng = Engine(engine.stage1, engine.stage2, cfg)
    s = eng.session(avatar, seed=SEED)
    for i in range(0, 32000, 320):  # 2 s, never pulled
        s.push_audio(AUDIO[i : i + 320])
    assert s.queued_frames > 6 and s.dropped_frames == s.queued_frames - 6
    held = {id(q.frame.image) for q in s._out}
    assert len(held) <= 7  # memory: at most limit + 1 distinct images are held
    frames = s.pull()
    assert [f.pts_samples for f in frames] == [k * 640 for k in range(len(frames))]
    assert np.array_equal(np.concatenate([f.audio for f in frames]), AUDIO[: len(frames) * 640])
    dropped = [f.meta["dropped"] for f in frames]
    assert all(dropped[:-6]) and not any(dropped[-6:])
    # The frames that kept their image are exactly the offline ones.
    _, images = offline_reference(engine, avatar, AUDIO[:32000], SEED)
    for f in frames[-6:]:
        assert np.array_equal(f.image, images[f.pts_samples // 640])
    # A backlog past max_backlog_s is refused, not stored.
    s.push_audio(np.zeros(16000, np.float32))
    s.push_audio(np.zeros(16000, np.float32))
    with pytest.raises(UserError, match="pull"):
        s.push_audio(np.zeros(16000, np.float32))
    s.pull()
    s.push_audio(np.zeros(16000, np.float32))


def test_big_push_renders_only_what_survives(engine, avatar):
    cfg = load_config("tiny", SMALL + ["stream.output_queue_frames=6"])
    eng = Engine(engine.stage1, engine.stage2, cfg)
    s = eng.session(avatar)
    s.push_audio(speechy(16000 * 10))
    w = eng.plan.window_frames
    assert s.queued_frames == eng.plan.windows_ready(160000) * w
    assert s.stats.frames_rendered <= 6 + w  # only the windows that stay in the queue
    assert s.dropped_frames == s.queued_frames - 6
    frames = s.pull()
    assert [f.meta["dropped"] for f in frames].count(False) == 6


def test_runtime_config_only_lets_runtime_keys_change(engine):
    cfg = engine.cfg
    out = runtime_config(
        cfg,
        cfg,
        ["stage2.sample_steps=2", "stage2.noise_scale=0.3", "stream.output_queue_frames=9"],
    )
    assert out.stage2.sample_steps == 2 and out.stream.output_queue_frames == 9
    assert out.stage2.noise_scale == 0.3
    with pytest.raises(UserError, match="noise_scale"):
        Engine(engine.stage1, engine.stage2, runtime_config(cfg, cfg, ["stage2.noise_scale=-1"]))
    with pytest.raises(UserError, match="fixed by the weights"):
        runtime_config(cfg, cfg, ["stage2.denoiser.d_model=64"])
    other = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, window_frames=5))
    assert runtime_config(cfg, other).stage2.window_frames == 5


def test_engine_load_round_trip_and_errors(tmp_path, engine, avatar, monkeypatch):
    from engine import weights
    from engine.loading import load_stage2
    from engine.weights import save_weights

    p1, p2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    save_weights(p1, engine.stage1.model.state_dict(), engine.cfg, "stage1")
    save_weights(p2, engine.stage2.nets.state_dict(), engine.cfg, "stage2")
    loaded = Engine.load(p1, p2, overrides=["stage2.sample_steps=3"])
    assert loaded.info["weights"] == "trained"
    a = stream(loaded.session(loaded.prepare_avatar(avatar.image)), AUDIO[:6000], [6000])
    b = stream(engine.session(avatar), AUDIO[:6000], [6000])
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    # stage 2 made for another stage 1
    bad_cfg = load_config("tiny", SMALL + ["stage1.motion_dim=8"])
    save_weights(tmp_path / "bad.safetensors", {}, bad_cfg, "stage2")
    with pytest.raises(UserError, match="motion_dim"):
        load_stage2(tmp_path / "bad.safetensors", stage1=engine.cfg.stage1)
    # no bundled weights: say how to get them
    monkeypatch.setattr(weights, "DEFAULT_STAGE1", tmp_path / "none1.safetensors")
    monkeypatch.setattr(weights, "DEFAULT_STAGE2", tmp_path / "none2.safetensors")
    with pytest.raises(UserError, match="livehead train stage1"):
        Engine.load()


def test_render_deadline_skips_late_windows_only(engine, avatar):
    cfg = load_config("tiny", SMALL + ["stream.render_deadline_ms=0.001"])
    late = Engine(engine.stage1, engine.stage2, cfg).session(avatar)
    late.push_audio(AUDIO[:16000])
    frames = late.pull()
    assert frames and late.dropped_frames == len(frames) == late.queued_frames + len(frames)
    assert np.array_equal(np.concatenate([f.audio for f in frames]), AUDIO[: len(frames) * 640])
    assert all(np.array_equal(f.image, avatar.image) for f in frames)  # the portrait
    frames[0].image[:] = 0  # a consumer drawing on a repeated frame changes nothing else
    assert np.array_equal(frames[1].image, avatar.image) and avatar.image.any()


def test_render_deadline_counts_from_a_live_sources_arrival(engine, avatar):
    """``push_audio(..., arrived=t)``: a live session's render deadline counts the audio's wait
    from t (a room passes its microphone's arrival time), so audio that queued elsewhere for
    too long is played without its images instead of holding the stream back. The per-session
    deadline (``Engine.session(render_deadline_ms=...)``, what ``make_session_factory`` sets
    from server.render_deadline_ms) overrides stream.render_deadline_ms; offline sessions
    never skip."""
    from engine.config import load_config as load
    from engine.stream import make_session_factory

    old = time.monotonic() - 10.0
    fresh = engine.session(avatar, render_deadline_ms=5000.0)
    fresh.push_audio(AUDIO[:16000])  # arrived now: rendered
    frames = fresh.pull()
    assert frames and fresh.dropped_frames == 0
    stale = engine.session(avatar, render_deadline_ms=5000.0)
    stale.push_audio(AUDIO[:16000], arrived=old)  # waited 10 s already: not rendered
    frames = stale.pull()
    assert frames and stale.dropped_frames == len(frames) + stale.queued_frames
    assert np.array_equal(np.concatenate([f.audio for f in frames]), AUDIO[: len(frames) * 640])
    offline = engine.session(avatar, live=False, render_deadline_ms=5000.0)
    offline.push_audio(AUDIO[:16000], arrived=old)
    assert offline.pull() and offline.dropped_frames == 0
    cfg = load("tiny", SMALL + ["server.render_deadline_ms=5000"])
    room_session = make_session_factory(cfg, engine)(avatar.image)
    room_session.push_audio(AUDIO[:16000], arrived=old)
    frames = room_session.pull()
    assert frames and room_session.dropped_frames == len(frames) + room_session.queued_frames


def test_render_deadline_counts_the_recent_render_time(engine, avatar):
    """The deadline weighs what rendering a window has recently cost: with a render estimate
    above the deadline the next windows are skipped, the estimate fades with each skip (one
    slow render does not stop the video for good), and rendering resumes."""
    # A deadline long against a window's motion (the wait counts it: up to ~160 ms here is
    # fine, so a slow or busy host does not change the outcome).
    s = engine.session(avatar, render_deadline_ms=1000.0)
    s._render_estimate_s = 1.3  # as after a 1.3 s render
    for i in range(0, 16000, 1280):  # 80 ms at a time: each push computes its own window
        s.push_audio(AUDIO[i : i + 1280])
    frames = s.pull()
    dropped = [bool(f.meta["dropped"]) for f in frames]
    # 1.3 -> skip (1.04) -> skip (0.832) -> render: the first two windows repeat the portrait
    assert dropped[:4] == [True] * 4 and not any(dropped[4:]), dropped
    assert s._render_estimate_s < 0.3  # renders since have brought it down


def test_server_render_deadline_default() -> None:
    """server.render_deadline_ms = -1: playout + lead frames less 50 ms (150 ms by default),
    longer for long windows (a skip freezes the picture for a whole window); set values and 0
    (off) are kept."""
    from engine.config import ServerConfig
    from engine.stream import server_render_deadline_ms

    assert server_render_deadline_ms(ServerConfig()) == pytest.approx(150.0)
    assert server_render_deadline_ms(ServerConfig(), window_frames=25) == pytest.approx(1070.0)
    assert server_render_deadline_ms(ServerConfig(playout_frames=5)) == pytest.approx(230.0)
    assert server_render_deadline_ms(ServerConfig(render_deadline_ms=0.0)) == 0.0
    assert server_render_deadline_ms(ServerConfig(render_deadline_ms=90.0)) == 90.0
