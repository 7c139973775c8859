"""Networks: pure nn.Modules (tensors in, tensors out; no I/O, no device logic)."""

from engine.models.stage1 import (
    CLUB,
    ArcMarginProduct,
    Discriminator,
    ImageEncoder,
    LinearMotionDecomposition,
    MotionHead,
    Renderer,
    Stage1Model,
    Stage1Output,
)

__all__ = [
    "CLUB",
    "ArcMarginProduct",
    "Discriminator",
    "ImageEncoder",
    "LinearMotionDecomposition",
    "MotionHead",
    "Renderer",
    "Stage1Model",
    "Stage1Output",
]
