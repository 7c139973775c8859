"""``stage1.head_reader``: the head reader (engine/models/stage1.py ``HeadReader``), anchored
video-driven reenactment (engine/reenact.py) and its trainer (training/reader.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, load_config
from engine.errors import UserError
from engine.models.stage1 import HEAD_DIMS, HEAD_MIRROR, HeadReader, Stage1Model
from engine.reenact import anchor_offset, driving_alpha, reenact_frames, reenact_stream
from engine.tensors import to_tensor, to_uint8
from engine.weights import KEEP_FP32, load_weights, save_weights
from tests.small import SMALL_STAGE1, crash_on_call


def _model(reader: bool = True, ready: bool = True, fields: int = HEAD_DIMS) -> Stage1Model:
    cfg = load_config("tiny", SMALL_STAGE1).stage1
    torch.manual_seed(0)
    m = Stage1Model(dataclasses.replace(cfg, head_reader=reader, head_reader_fields=fields))
    m.lmd.freeze()
    if reader and ready:
        assert m.head_reader is not None
        m.head_reader.ready.fill_(1.0)
    return m.eval()


def _frames(n: int, seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_reader_shapes_and_readiness() -> None:
    m = _model(ready=False)
    assert m.read_head(_frames(3, 0)).shape == (3, HEAD_DIMS)
    assert not m.reads_head  # untrained: reenactment stays absolute
    assert _model().reads_head
    plain = _model(reader=False)
    assert plain.head_reader is None and not plain.reads_head
    with pytest.raises(ConfigError, match="no head reader"):
        plain.read_head(_frames(1, 0))
    assert "head_reader" in _model().param_counts()


@torch.no_grad()
def test_read_head_reenactment_formula() -> None:
    """The head's fields: alpha_source + read(frame) - read(source); the rest: alpha_t -
    alpha_anchor + alpha_source; absolute without a (trained) reader."""
    m = _model()
    src, anchor, drv = _frames(1, 1), _frames(1, 2), _frames(5, 3)
    h, feats = m.encode(src)
    a_src, a_t = m.motion(h), m.motion(m.encode(drv)[0])
    want_alpha = a_t - m.motion(m.encode(anchor)[0]) + a_src
    want_alpha[:, :HEAD_DIMS] = a_src[:, :HEAD_DIMS] + m.read_head(drv) - m.read_head(src)
    want = m.render(h, feats, want_alpha).clamp(-1, 1)
    got = reenact_frames(m, src, drv, batch=2, anchor=anchor)
    assert torch.allclose(got, want, atol=1e-5)
    absolute = m.render(h, feats, a_t).clamp(-1, 1)
    assert (got - absolute).abs().max() > 1e-3  # the reader and the anchor change the output
    # the anchor moves only the rest; the head's fields ignore it (alpha itself: the small
    # untrained renderer draws nothing from alpha[HEAD_DIMS:])
    alpha = driving_alpha(m, drv, anchor_offset(m, src, h, anchor))
    assert torch.allclose(alpha, want_alpha, atol=1e-5)
    moved = driving_alpha(m, drv, anchor_offset(m, src, h, drv[:1]))
    assert torch.allclose(moved[:, :HEAD_DIMS], alpha[:, :HEAD_DIMS], atol=1e-6)
    shift = m.motion(m.encode(anchor)[0]) - m.motion(m.encode(drv[:1])[0])
    assert torch.allclose(moved[:, HEAD_DIMS:], alpha[:, HEAD_DIMS:] + shift[:, HEAD_DIMS:])
    # the default anchor is the driving video's first frame
    first = reenact_frames(m, src, drv, anchor=drv[:1])
    assert torch.allclose(reenact_frames(m, src, drv), first, atol=1e-6)
    # a reader of 14 fields: the face's fields as read, absolute
    m14 = _model(fields=14)
    off = anchor_offset(m14, src, m14.encode(src)[0], anchor)
    assert off is not None and torch.equal(off[:, HEAD_DIMS:14], torch.zeros(1, 8))
    got14 = driving_alpha(m14, drv, off)
    assert torch.allclose(got14[:, HEAD_DIMS:14], m14.read_head(drv)[:, HEAD_DIMS:], atol=1e-6)
    a14 = m14.motion(m14.encode(drv)[0]) - m14.motion(m14.encode(anchor)[0])
    assert torch.allclose(got14[:, 14:], a14[:, 14:] + m14.motion(m14.encode(src)[0])[:, 14:])
    # no reader (or an untrained one): absolute, whatever the anchor
    for other in (_model(reader=False), _model(ready=False)):
        h2, f2 = other.encode(src)
        plain = other.render(h2, f2, other.motion(other.encode(drv)[0])).clamp(-1, 1)
        assert torch.allclose(reenact_frames(other, src, drv, anchor=anchor), plain, atol=1e-5)


@torch.no_grad()
def test_stream_anchors_on_its_first_frame() -> None:
    m = _model()
    portrait = to_uint8(_frames(1, 4))[0]
    drv = to_uint8(_frames(7, 5))
    got = np.stack(list(reenact_stream(m, portrait, iter(drv), batch=3)))
    want = to_uint8(reenact_frames(m, to_tensor(portrait[None]), to_tensor(drv)))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def _args(tmp: Path, init: Path, **over: object) -> argparse.Namespace:
    a = dict(
        init_from=str(init),
        out=str(tmp / "out.safetensors"),
        run_dir=str(tmp / "run"),
        steps=4,
        batch=2,
        lr=1e-3,
        seed=3,
        ckpt_every=2,
        resume=False,
        threads=0,
        warm_start=False,
        size=0,
        fields=0,
    )
    a.update(over)
    return argparse.Namespace(**a)


def test_reader_training_resume_and_output(tmp_path: Path, monkeypatch) -> None:
    """4 steps straight = 2 steps, a crash, --resume; the output is the input plus a ready
    reader that ``load_stage1`` builds, with its held-out accuracy in the metadata."""
    import training.reader as tr
    from engine.loading import load_stage1

    cfg = load_config(
        "tiny", [*SMALL_STAGE1, "stage1.head_reader=false", "stage1.head_reader_fields=6"]
    )
    torch.manual_seed(0)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    init = tmp_path / "s1.safetensors"
    save_weights(init, m.state_dict(), cfg, kind="stage1")
    monkeypatch.setattr(tr, "evaluate_reader", lambda reader, world: {"mae_std": 0.5})

    straight = tmp_path / "a"
    assert tr.run(_args(straight, init)) == 0

    crashed = tmp_path / "b"
    restore = crash_on_call(monkeypatch, tr, "reader_batch")
    with pytest.raises(KeyboardInterrupt):
        tr.run(_args(crashed, init))
    restore()
    with pytest.raises(Exception, match="--resume"):
        tr.run(_args(crashed, init))  # a run dir with a checkpoint is never overwritten
    with pytest.raises(Exception, match="--steps 5"):
        tr.run(_args(crashed, init, steps=5, resume=True))
    for other in ({"size": 256}, {"fields": 14}):  # the checkpoint's reader has another shape
        with pytest.raises(Exception, match="not a reader run with"):
            tr.run(_args(crashed, init, resume=True, **other))
    assert tr.run(_args(crashed, init, resume=True)) == 0

    ta, cfg_a, meta_a = load_weights(straight / "out.safetensors", "stage1")
    tb, _, _ = load_weights(crashed / "out.safetensors", "stage1")
    assert cfg_a.stage1.head_reader and meta_a["head_reader"]["mae_std"] == 0.5
    reader_keys = [k for k in ta if k.startswith("head_reader.")]
    assert reader_keys and all(torch.equal(ta[k], tb[k]) for k in ta)
    src, _, _ = load_weights(init, "stage1")
    for k, v in src.items():  # nothing else changed (stored as fp16, as the stage-1 trainer does)
        assert torch.equal(ta[k], v if k.endswith(KEEP_FP32) else v.half().float()), k
    loaded, _, _ = load_stage1(straight / "out.safetensors")
    assert loaded.reads_head
    assert loaded.head_reader is not None
    lin = torch.linspace(-1.0, 1.0, loaded.head_reader.size)
    assert torch.equal(loaded.head_reader.coords[0, 0], lin)  # kept in fp32 by the fp16 file

    # --warm-start continues the trained reader (a vanishing lr keeps it) and chains the record
    with pytest.raises(Exception, match="no trained head reader"):
        tr.run(_args(tmp_path / "c", init, warm_start=True))
    done = straight / "out.safetensors"
    for warm, name in ((True, "d"), (False, "e")):
        assert tr.run(_args(tmp_path / name, done, warm_start=warm, lr=1e-9, steps=2)) == 0
        td, _, meta_d = load_weights(tmp_path / name / "out.safetensors", "stage1")
        kept = all(torch.allclose(td[k], ta[k], atol=1e-3) for k in reader_keys)
        assert kept == warm and float(td["head_reader.ready"]) == 1.0
        rec = meta_d["head_reader"]
        assert rec["total_steps"] == (6 if warm else 2)
        assert ("warm_from" in rec) == warm and rec.get("warm_from", {}).get("steps") in (4, None)

    # --fields 14 from a reader of 6: the head's outputs kept (a vanishing lr), 8 new ones
    parser = argparse.ArgumentParser()
    tr.add_args(parser)
    assert parser.parse_args(["--out", "x", "--fields", "14"]).fields == 14
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--fields", "7"])
    assert tr.run(_args(tmp_path / "h", done, warm_start=True, fields=14, lr=1e-9, steps=2)) == 0
    th, cfg_h, meta_h = load_weights(tmp_path / "h" / "out.safetensors", "stage1")
    assert cfg_h.stage1.head_reader_fields == 14 and th["head_reader.out.weight"].shape[0] == 14
    for k in reader_keys:  # the 6 outputs and the body kept, 8 new outputs
        if k.startswith("head_reader.out."):
            assert torch.allclose(th[k][:6], ta[k], atol=1e-3), k
            assert not torch.allclose(th[k][6:12], ta[k], atol=1e-3), k
        else:
            assert torch.allclose(th[k], ta[k], atol=1e-3), k
    assert meta_h["head_reader"]["fields"] == 14
    with pytest.raises(Exception, match="reads more than --fields 6"):
        tr.run(_args(tmp_path / "i", tmp_path / "h" / "out.safetensors", warm_start=True, fields=6))
    r14, _, _ = load_stage1(tmp_path / "h" / "out.safetensors")
    assert r14.read_head(_frames(2, 7)).shape == (2, 14)

    # --size: a reader that reads at 256² (a fine branch next to the 128² body), recorded in
    # the config; a trained 128² reader grows to it and reads as before (a vanishing lr)
    assert tr.run(_args(tmp_path / "f", done, warm_start=True, size=256, lr=1e-9, steps=2)) == 0
    small, _, _ = load_stage1(done)
    grown, cfg_f, _ = load_stage1(tmp_path / "f" / "out.safetensors")
    assert grown.head_reader is not None and grown.head_reader.size == 256
    assert cfg_f.stage1.head_reader_size == 256
    x = _frames(3, 8, size=256)
    torch.testing.assert_close(grown.read_head(x), small.read_head(x), atol=2e-3, rtol=0)
    grown_file = tmp_path / "f" / "out.safetensors"
    with pytest.raises(Exception, match="at that size only"):
        tr.run(_args(tmp_path / "f2", grown_file, warm_start=True, size=128))
    assert tr.run(_args(tmp_path / "g", done, size=256, steps=2)) == 0
    big, _, _ = load_stage1(tmp_path / "g" / "out.safetensors")
    _, cfg_g, meta_g = load_weights(tmp_path / "g" / "out.safetensors", "stage1")
    assert big.head_reader is not None and big.head_reader.size == 256
    assert cfg_g.stage1.head_reader_size == 256 and meta_g["head_reader"]["size"] == 256
    assert big.read_head(_frames(2, 6, size=256)).shape == (2, HEAD_DIMS)
    assert not torch.allclose(big.read_head(x), small.read_head(x), atol=2e-3)  # fresh
    with pytest.raises(ConfigError, match="128 · 2\\^k"):
        HeadReader(size=192)


def test_read_mirrors_as_the_world_does() -> None:
    """``HeadReader.read`` averages a frame's reading with its mirror's, mirrored back by
    HEAD_MIRROR's signs and the eyes swapped: the world must draw a mirrored head that way.
    Heads driven by mirrored rows land every landmark on the mirror image of the other's, the
    left eye on the right one's."""
    from training.world import get_identity, heldout_ids
    from training.world.motion import MOTION_FIELDS, motion_row
    from training.world.render import landmarks

    cfg = load_config("tiny")
    idn = get_identity(cfg.world, int(heldout_ids(cfg.world)[0]))
    head = dict(zip(MOTION_FIELDS[:HEAD_DIMS], (0.2, 0.05, 0.04, 0.1, 0.15, 0.38), strict=True))
    a = landmarks(idn, motion_row(**head), 256)
    b = landmarks(idn, motion_row(**{k: v * s for (k, v), s in zip(head.items(), HEAD_MIRROR)}))
    for name, twin in (("nose_tip", "nose_tip"), ("chin", "chin"), ("eye_l", "eye_r")):
        np.testing.assert_allclose([255 - a[name][0], a[name][1]], b[twin], atol=1e-6)
        np.testing.assert_allclose([255 - b[name][0], b[name][1]], a[twin], atol=1e-6)
    perm = HeadReader(fields=14).mirror_perm.tolist()
    assert [MOTION_FIELDS[i] for i in perm][9:11] == ["blink_r", "blink_l"]


def test_reader_batch_truth_matches_alpha_convention() -> None:
    """The reader's targets are alpha[0:HEAD_DIMS]'s units: the world's standardised fields."""
    from training.reader import reader_batch
    from training.world import train_ids

    world = load_config("tiny").world
    x, y = reader_batch(world, train_ids(world)[:5], np.random.default_rng(0), 12, size=64)
    assert x.shape == (12, 3, 64, 64) and y.shape == (12, HEAD_DIMS)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert 0.2 < float(y.std()) < 3.0  # standardised, not raw (raw spreads are ~0.03-0.15)


def test_stage1_training_carries_the_reader(tmp_path: Path) -> None:
    """A warm start from weights with a trained reader keeps it, frozen, through training steps
    (it is trained alone by `livehead train reader`); a config without it drops it."""
    from tests.test_stage1_training import SMALL
    from training.common import DistInfo
    from training.stage1 import Stage1Options, Stage1Trainer

    cfg = load_config("tiny", SMALL)
    assert cfg.stage1.head_reader  # the tiny config has it
    torch.manual_seed(1)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    assert m.head_reader is not None
    m.head_reader.ready.fill_(1.0)
    w = tmp_path / "s1.safetensors"
    record = {"steps": 7, "mae_std": 0.1}
    save_weights(w, m.state_dict(), cfg, kind="stage1", meta={"head_reader": record})
    torch.set_num_threads(1)
    t = Stage1Trainer(
        cfg, Stage1Options(run_dir=tmp_path / "a", steps=2, init_from=str(w)), DistInfo()
    )
    t.fit()
    t.export(tmp_path / "x.safetensors")  # the reader's training record goes with it
    assert load_weights(tmp_path / "x.safetensors", "stage1")[2]["head_reader"] == record
    t.save()
    resumed = Stage1Trainer(
        cfg, Stage1Options(run_dir=tmp_path / "a", steps=2, resume=True), DistInfo()
    )
    assert resumed.reader_meta == record
    out = t.model.state_dict()
    for k, v in m.state_dict().items():
        if k.startswith("head_reader."):
            assert torch.equal(out[k], v), k
    assert any(not torch.equal(out[k], v) for k, v in m.state_dict().items())  # it trained
    plain = load_config("tiny", [*SMALL, "stage1.head_reader=false"])
    t2 = Stage1Trainer(
        plain, Stage1Options(run_dir=tmp_path / "b", steps=0, init_from=str(w)), DistInfo()
    )
    assert t2.model.head_reader is None
    # a reader of another shape than the config's is refused, naming the key to set
    for key, value in (("head_reader_fields", 6), ("head_reader_size", 256)):
        other = load_config("tiny", [*SMALL, f"stage1.{key}={value}"])
        with pytest.raises(UserError, match=f"stage1.{key}"):
            Stage1Trainer(
                other, Stage1Options(run_dir=tmp_path / key, steps=0, init_from=str(w)), DistInfo()
            )


@torch.no_grad()
def test_read_is_mirror_symmetric() -> None:
    """``HeadReader.read`` averages the frame's and the mirrored frame's readings: reading a
    mirrored frame gives the mirrored fields (yaw, roll, loc_x, gaze_x negated in world units,
    the eyelids swapped)."""
    from engine.models.stage1 import (
        FACE_FIELD_MEAN,
        FACE_FIELD_STD,
        HEAD_FIELD_MEAN,
        HEAD_FIELD_STD,
    )

    mean = torch.tensor(HEAD_FIELD_MEAN + FACE_FIELD_MEAN)
    std = torch.tensor(HEAD_FIELD_STD + FACE_FIELD_STD)
    sign = torch.tensor([-1.0, 1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 1])
    x = _frames(3, 6)
    for m in (_model(), _model(fields=14)):
        a, b = m.read_head(x), m.read_head(x.flip(-1))
        f = a.shape[1]
        world_a, world_b = a * std[:f] + mean[:f], b * std[:f] + mean[:f]
        want = world_a * sign[:f]
        if f == 14:
            want = want[:, [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 11, 12, 13]]
        assert torch.allclose(world_b, want, atol=1e-5)
        assert not torch.allclose(a, b, atol=1e-3)


def test_reader_error_split_separates_identity_bias() -> None:
    """A reader off by a constant is all bias: the frame-to-frame part does not move."""
    from training.reader import reader_error_split

    world = load_config("tiny").world

    class Const:
        fields = HEAD_DIMS

        def __init__(self, c: float) -> None:
            self.c = c

        def read(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], HEAD_DIMS), self.c)

    a = reader_error_split(Const(0.0), world, n_ids=2, frames=3)  # type: ignore[arg-type]
    b = reader_error_split(Const(50.0), world, n_ids=2, frames=3)  # type: ignore[arg-type]
    assert a["identities"] == 2 and a["frames"] == 3 and len(a["fields"]) == HEAD_DIMS
    assert a["within_identity"] == pytest.approx(b["within_identity"], abs=1e-3)
    assert all(45.0 < v < 55.0 for v in b["per_identity_bias"])
    assert all(w > 0 for w in a["within_identity"])  # the clip moves the head


def test_average_weights(tmp_path: Path) -> None:
    """`livehead train average`: the weighted mean of one model's files; refuses another
    config, a differing LMD basis, and a single file."""
    from training.average import average

    cfg = load_config("tiny", SMALL_STAGE1)
    torch.manual_seed(0)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    a = m.state_dict()
    b = {k: v + 1.0 if "renderer" in k and v.is_floating_point() else v for k, v in a.items()}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_weights(pa, a, cfg, kind="stage1", meta={"step": 1})
    save_weights(pb, b, cfg, kind="stage1", meta={"step": 2})
    out, _, meta = average([str(pa), str(pb)], [1.0, 3.0])
    k = next(k for k in a if "renderer" in k and a[k].is_floating_point())
    assert torch.allclose(out[k], a[k] + 0.75, atol=1e-5)
    assert meta["averaged"]["mix"] == [0.25, 0.75] and meta["averaged"]["steps"] == [1, 2]
    with pytest.raises(Exception, match="at least two"):
        average([str(pa)])
    q = {
        kk: v + 0.5 if kk.startswith("lmd.") and v.is_floating_point() else v for kk, v in a.items()
    }
    save_weights(tmp_path / "q.safetensors", q, cfg, kind="stage1")
    with pytest.raises(Exception, match="LMD basis"):
        average([str(pa), str(tmp_path / "q.safetensors")])
    other = load_config("tiny", [*SMALL_STAGE1, "stage1.head_reader=false"])
    m2 = Stage1Model(other.stage1)
    m2.lmd.freeze()
    save_weights(tmp_path / "o.safetensors", m2.state_dict(), other, kind="stage1")
    with pytest.raises(Exception, match="another config"):
        average([str(pa), str(tmp_path / "o.safetensors")])
