"""Real talking-face videos -> AniTalker-style training clips, and the reader training uses.

- ``prepare.prepare_videos(inputs, out_dir, PrepareOptions(...)) -> Manifest``: the pipeline
  (``livehead data prepare``; arguments in ``cli.add_prepare_args`` / ``cli.run_prepare``).
- ``dataset.RealClips(out_dir)``: random access to the prepared clips and ``sample_pair``.
- ``detect``: Haar face detection, tracking, yaw estimate and blur score; ``video``: PyAV I/O.

Submodules are imported explicitly so that ``import training.realdata`` stays cheap (no OpenCV).
"""
