"""The preprocessed media of one prompt, as the processor hands it to the engine and the model.

Pure data (no model code): :mod:`qwen2vl.processor` builds it, :mod:`qwen2vl.engine` carries and hashes it,
:mod:`qwen2vl.model` consumes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VisionInputs"]


@dataclass
class VisionInputs:
    """Preprocessed media of one prompt, in prompt order within each kind."""
    pixel_values: torch.Tensor | None = None  # (N_img_patches, 1176)
    image_grid_thw: list[tuple[int, int, int]] | None = None
    pixel_values_videos: torch.Tensor | None = None  # (N_vid_patches, 1176)
    video_grid_thw: list[tuple[int, int, int]] | None = None
