"""The on-disk layout of a prepared real-video dataset, shared by the writer and the reader.

    out_dir/
      manifest.jsonl                  one JSON record per kept clip (the clip's .json + "path")
      report.json                     options, what was kept and what was dropped and why
      clips/<identity>/<clip>.mp4     256² H.264, 25 fps, 16 kHz mono AAC when the source had audio
      clips/<identity>/<clip>.json    source path, crop box, frame range, fps, audio, yaw, blur

Frame ranges count frames of the source *after* resampling to 25 fps, from its first frame.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError

MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "report.json"
CLIPS_DIR = "clips"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """A prepared dataset: its clip records (manifest order) and the run report."""

    out_dir: Path
    clips: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def identities(self) -> list[str]:
        """Identity names in first-appearance order."""
        return list(dict.fromkeys(c["identity"] for c in self.clips))

    def clip_path(self, i: int) -> Path:
        return self.out_dir / self.clips[i]["path"]

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST_NAME
        if not path.is_file():
            raise UserError(
                f"no {MANIFEST_NAME} in {out_dir}: prepare the dataset first "
                f"(livehead data prepare VIDEOS... --out {out_dir})"
            )
        clips = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                clips.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e})") from e
        report_path = out_dir / REPORT_NAME
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return cls(out_dir, clips, report)

    def save(self) -> None:
        """Write manifest.jsonl and report.json atomically (temp file, then rename)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(
            self.out_dir / MANIFEST_NAME, "".join(json.dumps(c) + "\n" for c in self.clips)
        )
        _write_atomic(self.out_dir / REPORT_NAME, json.dumps(self.report, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
