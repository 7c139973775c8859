"""Diffusion schedule, DDIM sampler, α normaliser, and windowed generation
(streaming == offline, bit for bit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.audio import LogMelFrontend, silence_feature_row
from engine.config import ConformerConfig, Stage2Config
from engine.diffusion import (
    AlphaNormalizer,
    DiffusionSchedule,
    ddim_sample,
    ddim_timesteps,
    linear_betas,
)
from engine.errors import UserError
from engine.models.stage2 import Stage2Nets
from engine.session_api import Controls
from engine.windowing import (
    ControlTrack,
    MotionStreamer,
    WindowPlan,
    generate_offline,
    generate_window,
    offline_features,
    prefix_alpha,
    segment_features,
    window_noise,
)

SCHED = DiffusionSchedule.linear(1000, 1e-4, 0.02)


# --------------------------------------------------------------------------------------------
# Schedule and sampler
# --------------------------------------------------------------------------------------------
def test_schedule_and_q_sample():
    betas = linear_betas(1000, 1e-4, 0.02)
    assert betas.shape == (1000,) and betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-12
    acp = SCHED.alphas_cumprod
    assert torch.all(acp[1:] < acp[:-1]) and 0 < acp[-1] < 1e-4
    x0 = torch.randn(3, 7, 20)
    noise = torch.randn(3, 7, 20)
    t = torch.tensor([0, 500, 999])
    xt = SCHED.q_sample(x0, t, noise)
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    a = float(acp[500])
    torch.testing.assert_close(xt[1], math.sqrt(a) * x0[1] + math.sqrt(1 - a) * noise[1])
    torch.testing.assert_close(SCHED.predict_x0(xt, t, noise), x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        linear_betas(0)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 2) == [999, 499]
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and len(set(ts)) == 50
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)


def _oracle(x0: torch.Tensor, schedule: DiffusionSchedule):
    """A perfect denoiser for a single known x0: returns the exact noise in x_t."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alphas_cumprod[t].to(torch.float32).reshape(-1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 25, 50])
def test_ddim_recovers_x0_with_an_oracle(steps):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.rand(2, 9, 20, generator=g) * 1.8 - 0.9
    x_T = torch.randn(2, 9, 20, generator=g)
    out = ddim_sample(_oracle(x0, SCHED), x_T, SCHED, steps)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    # stateless: same inputs, same output
    assert torch.equal(ddim_sample(_oracle(x0, SCHED), x_T, SCHED, steps), out)


def test_ddim_clamps_predicted_x0():
    def zero(x_t, t):
        return torch.zeros_like(x_t)

    x_T = torch.randn(1, 5, 20) * 3
    out = ddim_sample(zero, x_T, SCHED, 4)
    assert out.abs().max() <= 1.0
    assert ddim_sample(zero, x_T, SCHED, 4, clamp=None).abs().max() > 1.0


def test_ddim_known_entries_are_inpainted_exactly():
    calls = []

    def denoise(x_t, t):
        calls.append(x_t.clone())
        return torch.zeros_like(x_t)

    x_T = torch.randn(1, 6, 20)
    known = torch.rand(1, 6, 20) - 0.5
    mask = torch.zeros(1, 6, 1)
    mask[:, :2] = 1
    out = ddim_sample(denoise, x_T, SCHED, 3, known=known, known_mask=mask)
    assert torch.equal(out[:, :2], known[:, :2])
    # what the network saw on known frames is the known x0 diffused with x_T's noise
    a = float(SCHED.alphas_cumprod[999])
    torch.testing.assert_close(
        calls[0][:, :2], math.sqrt(a) * known[:, :2] + math.sqrt(1 - a) * x_T[:, :2]
    )
    with pytest.raises(ValueError):
        ddim_sample(denoise, x_T, SCHED, 3, known=known)


def test_alpha_normalizer():
    data = torch.randn(500, 20) * torch.linspace(0.1, 5, 20) + torch.linspace(-3, 3, 20)
    norm = AlphaNormalizer(20).fit(data, mode="minmax", margin=0.05)
    z = norm.normalize(data)
    assert z.abs().max() <= 1.0 and z.abs().max() > 0.9
    torch.testing.assert_close(norm.denormalize(z), data, rtol=1e-5, atol=1e-5)
    sd = norm.state_dict()
    assert set(sd) == {"center", "half_range"}
    fresh = AlphaNormalizer(20)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.normalize(data), z)
    ms = AlphaNormalizer(20).fit(data, mode="meanstd", k=3.0)
    assert (ms.normalize(data).abs() <= 1).float().mean() > 0.98
    with pytest.raises(ValueError):
        AlphaNormalizer(20).fit(data, mode="bogus")


# --------------------------------------------------------------------------------------------
# Window plan and inputs
# --------------------------------------------------------------------------------------------
def test_window_plan():
    plan = WindowPlan(window_frames=3, prefix_frames=8, lookahead_frames=2, context_frames=25)
    assert plan.segment(0) == (-25, 5) and plan.segment(2) == (-19, 11)
    assert plan.feature_span(1) == (-88, 32)
    assert plan.samples_needed(0) == 5 * 640 and plan.samples_needed(4) == 17 * 640
    for n in range(0, 30 * 640, 97):
        ready = plan.windows_ready(n)
        assert all(plan.samples_needed(i) <= n for i in range(ready))
        assert plan.samples_needed(ready) > n
    assert plan.num_windows(10) == 4 and plan.total_samples(10) == plan.samples_needed(3)
    assert plan.segment_frames == 30 and plan.denoise_frames == 11 and plan.latency_frames == 5
    assert plan.latency_samples == 5 * 640
    cfg = Stage2Config(window_frames=3, prefix_frames=8, lookahead_frames=2)
    assert WindowPlan.from_config(cfg, 4).context_frames == 25
    with pytest.raises(UserError, match="audio_context_frames"):
        WindowPlan(3, 8, 2, context_frames=4)


def test_window_inputs():
    a = window_noise(7, 3, 11, 20)
    assert a.shape == (11, 20) and torch.equal(a, window_noise(7, 3, 11, 20))
    assert not torch.equal(a, window_noise(7, 4, 11, 20))
    assert not torch.equal(a, window_noise(8, 3, 11, 20))
    ref = torch.full((20,), 2.0)
    hist = torch.arange(3 * 20, dtype=torch.float32).reshape(3, 20)
    p = prefix_alpha(hist, ref, 5)
    assert torch.equal(p[:2], ref.expand(2, 20)) and torch.equal(p[2:], hist)
    assert torch.equal(prefix_alpha(hist, ref, 2), hist[1:])
    assert prefix_alpha(hist, ref, 0).shape == (0, 20)
    plan = WindowPlan(3, 2, 1, 4, feature_frames_per_video_frame=1)
    feats = torch.arange(20, dtype=torch.float32)[:, None]
    pad = torch.tensor([-1.0])
    assert segment_features(feats, 0, plan, 0, pad)[:, 0].tolist() == [-1] * 4 + [0, 1, 2, 3]
    assert segment_features(feats[5:], 5, plan, 3, pad)[:, 0].tolist() == list(range(5, 13))
    with pytest.raises(ValueError):
        segment_features(feats[:10], 0, plan, 3, pad)


def test_control_track():
    track = ControlTrack()
    track.set(0, Controls(pose_deg=(45.0, 0.0, -9.0)))
    track.set(6, Controls(location=0.25))
    values, mask = track.segment(-2, 8)
    assert mask[:8].tolist() == [[0, 0, 1]] * 8 and mask[8:].tolist() == [[1, 0, 0]] * 2
    torch.testing.assert_close(values[0, 2:], torch.tensor([0.5, 0.0, -0.1]))
    assert values[9, 0] == 0.25
    track.set(4, None)  # a change drops later ones
    values, mask = track.segment(0, 10)
    assert mask[4:].sum() == 0 and mask[:4, 2].sum() == 4
    with pytest.raises(UserError):
        ControlTrack().set(0, Controls(location=float("nan")))


# --------------------------------------------------------------------------------------------
# Windowed generation: streaming == offline
# --------------------------------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    small = ConformerConfig(d_model=32, heads=2, ffn_dim=32, blocks=2, conv_kernel=5)
    cfg = Stage2Config(
        speech=small,
        denoiser=ConformerConfig(d_model=48, heads=2, ffn_dim=48, blocks=2, conv_kernel=5),
        adapter_hidden=16,
        cond_dim=16,
        window_frames=3,
        prefix_frames=4,
        lookahead_frames=2,
        audio_context_frames=6,
    )
    nets = Stage2Nets(cfg, feat_dim=80, frames_per_video_frame=4, latent_dim=24).eval()
    nets.normalizer.fit(torch.randn(100, 20) * 2 + 1)
    plan = WindowPlan.from_config(cfg, 4)
    ref_alpha, ref_h = torch.randn(20) * 2 + 1, torch.randn(24)
    return nets, plan, ref_alpha, ref_h


def _audio(n: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    t = np.arange(n) / 16000
    env = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)  # bursts and silences
    return (env * (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n))).astype(
        np.float32
    )


@pytest.mark.parametrize("guidance", [0.0, 0.8])
@pytest.mark.parametrize("chunking", ["10ms", "333ms", "random"])
def test_streaming_equals_offline_bit_exact(chunking, guidance):
    nets, plan, ref_alpha, ref_h = _tiny()
    fe = LogMelFrontend()
    pad = silence_feature_row(fe)
    audio = _audio(16000 + 1234)  # 1.08 s: 27 frames, the last one partial -> 9 windows
    track = ControlTrack()
    track.set(7, Controls(pose_deg=(20.0, -5.0, 0.0)))
    common = dict(seed=11, steps=4, schedule=SCHED, noise_scale=0.7, control_guidance=guidance)

    feats, n_frames = offline_features(fe, audio, plan)
    assert n_frames == 27
    offline = generate_offline(
        nets, plan, feats, ref_alpha, ref_h, n_frames, pad_row=pad, controls=track, **common
    )
    assert offline.shape == (27, 20) and torch.isfinite(offline).all()

    streamer = MotionStreamer(nets, plan, ref_alpha, ref_h, controls=track, **common)
    rng = np.random.default_rng(9)
    windows, pos = [], 0
    while pos < audio.size:
        n = {"10ms": 160, "333ms": 5328}.get(chunking) or int(rng.integers(1, 4000))
        got = streamer.push_audio(audio[pos : pos + n])
        pos += n
        # a window is emitted exactly when its audio (window + look-ahead) is in
        assert streamer.next_window == plan.windows_ready(min(pos, audio.size))
        windows += got
    windows += streamer.finish()
    streamed = torch.cat(windows)[:n_frames]
    assert torch.equal(streamed, offline)
    # the stream kept only the features it still needs
    assert streamer.feats.shape[0] <= 4 * plan.segment_frames + 4 * plan.window_frames + 4000 // 160


def test_lookahead_is_bounded():
    nets, plan, ref_alpha, ref_h = _tiny()
    fe = LogMelFrontend()
    pad = silence_feature_row(fe)
    audio = _audio(16000)
    changed = audio.copy()
    cut = plan.samples_needed(2)
    changed[cut:] = -changed[cut:] + 0.1
    outs = []
    for a in (audio, changed):
        feats, n = offline_features(fe, a, plan)
        outs.append(
            generate_offline(
                nets, plan, feats, ref_alpha, ref_h, n, seed=0, steps=3, schedule=SCHED, pad_row=pad
            )
        )
    w = plan.window_frames
    assert torch.equal(outs[0][: 3 * w], outs[1][: 3 * w])  # windows 0..2 never saw it
    assert not torch.equal(outs[0][3 * w :], outs[1][3 * w :])


def test_noise_scale_is_a_temperature():
    """noise_scale 1 is the plain sampler; 0 gives every seed the same motion; in between the
    spread across seeds shrinks."""
    nets, plan, ref_alpha, ref_h = _tiny()
    fe = LogMelFrontend()
    feats, n = offline_features(fe, _audio(16000), plan)
    kw = dict(steps=3, schedule=SCHED, pad_row=silence_feature_row(fe))

    def run(seed: int, **extra) -> torch.Tensor:
        return generate_offline(nets, plan, feats, ref_alpha, ref_h, n, seed=seed, **kw, **extra)

    assert torch.equal(run(0, noise_scale=1.0), run(0))
    assert torch.equal(run(0, noise_scale=0.0), run(1, noise_scale=0.0))
    spread = [(run(0, noise_scale=s) - run(1, noise_scale=s)).abs().mean() for s in (1.0, 0.3)]
    assert spread[1] < spread[0]


def test_controls_change_the_window_and_seed_matters():
    nets, plan, ref_alpha, ref_h = _tiny()
    fe = LogMelFrontend()
    pad = silence_feature_row(fe)
    feats, _ = offline_features(fe, _audio(16000), plan)
    seg = segment_features(feats, 0, plan, 2, pad)
    prefix = prefix_alpha(torch.randn(6, 20), ref_alpha, plan.prefix_frames)
    noise = window_noise(0, 2, plan.denoise_frames, 20)
    kw = dict(steps=4, schedule=SCHED)
    free = generate_window(nets, plan, seg, prefix, ref_alpha, ref_h, noise, **kw)
    assert free.shape == (plan.window_frames, 20)
    # clamped in normalised space -> within the normaliser's range in raw α
    lo = nets.normalizer.denormalize(-torch.ones(20))
    hi = nets.normalizer.denormalize(torch.ones(20))
    assert torch.all(free >= lo - 1e-5) and torch.all(free <= hi + 1e-5)
    # passing the adapter's own prediction as a control changes nothing; a different pose does
    s = plan.segment_frames
    _, pred = nets.encode(seg[None], torch.zeros(1, s, 5), torch.zeros(1, s, 3))
    same = generate_window(
        nets, plan, seg, prefix, ref_alpha, ref_h, noise, controls=(pred[0], torch.ones(s, 3)), **kw
    )
    torch.testing.assert_close(same, free)
    pose = pred[0].clone()
    pose[:, 2:] = torch.tensor([0.5, -0.2, 0.1])
    mask = torch.tensor([0.0, 0.0, 1.0]).expand(s, 3)
    posed = generate_window(
        nets, plan, seg, prefix, ref_alpha, ref_h, noise, controls=(pose, mask), **kw
    )
    assert not torch.allclose(posed, free)
    other_seed = generate_window(
        nets, plan, seg, prefix, ref_alpha, ref_h, window_noise(1, 2, plan.denoise_frames, 20), **kw
    )
    assert not torch.allclose(other_seed, free)


def test_control_guidance_pushes_towards_the_control():
    """guidance 0 is the plain sampler; without a control, or with the adapter's own prediction
    as the control, guidance changes nothing; with a commanded pose it moves the window further
    from the free motion than the plain sampler does (eps(c) + g·(eps(c) − eps(c_pred)))."""
    nets, plan, ref_alpha, ref_h = _tiny()
    fe = LogMelFrontend()
    feats, _ = offline_features(fe, _audio(16000), plan)
    seg = segment_features(feats, 0, plan, 2, silence_feature_row(fe))
    prefix = prefix_alpha(torch.randn(6, 20), ref_alpha, plan.prefix_frames)
    noise = window_noise(0, 2, plan.denoise_frames, 20)
    kw = dict(steps=4, schedule=SCHED)

    def run(controls=None, g: float = 0.0) -> torch.Tensor:
        return generate_window(
            nets, plan, seg, prefix, ref_alpha, ref_h, noise, controls=controls, guidance=g, **kw
        )

    free = run()
    assert torch.equal(run(g=1.0), free)
    s = plan.segment_frames
    _, pred = nets.encode(seg[None], torch.zeros(1, s, 5), torch.zeros(1, s, 3))
    torch.testing.assert_close(run((pred[0], torch.ones(s, 3)), 1.0), free)
    pose = pred[0].clone()
    pose[:, 2:] = torch.tensor([0.5, -0.2, 0.1])
    ctrl = (pose, torch.tensor([0.0, 0.0, 1.0]).expand(s, 3))
    plain, guided = run(ctrl), run(ctrl, 1.0)
    assert torch.equal(run(ctrl, 0.0), plain)
    assert (guided - free).norm() > 1.2 * (plain - free).norm()


def test_control_track_stays_bounded_and_exact() -> None:
    """A stream's control changes are pruned once no future segment can read them, without
    changing what the segments that can still be read contain."""
    from engine.session_api import Controls
    from engine.windowing import ControlTrack

    full, pruned = ControlTrack(), ControlTrack()
    context = 25
    for i in range(3000):
        frame = 3 * i
        c = Controls(pose_deg=(float(i % 17), 0.0, 0.0))
        full.set(frame, c)
        pruned.set(frame, c, keep_from=frame - context)
        lo = frame - context
        assert all(
            torch.equal(a, b)
            for a, b in zip(full.segment(lo, frame + 5), pruned.segment(lo, frame + 5))
        )
    assert len(full) == 3000 and len(pruned) <= context // 3 + 2


def test_control_track_move_pending() -> None:
    from engine.session_api import Controls
    from engine.windowing import ControlTrack

    t = ControlTrack()
    t.set(0, Controls(location=0.1))
    t.set(30, Controls(location=0.5))
    t.move_pending(20)  # interrupt at frame 20: the pending change applies from there
    values, mask = t.segment(18, 22)
    assert values[:2, 0].tolist() == pytest.approx([0.1, 0.1])
    assert values[2:, 0].tolist() == pytest.approx([0.5, 0.5])
