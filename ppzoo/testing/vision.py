"""Tiny vision-language models and image batches, for checking ppzoo's vision path.

Each tiny config keeps its family's structure (the vision tower's kind, the projector, how image
features are merged, the language model's attention) at sizes that run in seconds on a CPU. An
image batch holds token ids with each image expanded to as many image tokens as the model's own
``get_image_features`` returns features for it, the family's per-token inputs, and labels that
ignore the image tokens, as a processor and a fine-tuning recipe would give them.

The pieces live in modules named for them: the tiny configs in
:mod:`ppzoo.testing.tiny_vision_configs`, the image batches in :mod:`ppzoo.testing.image_batches`,
the image step check in :mod:`ppzoo.testing.vision_step`, and the zoo's second table in
:mod:`ppzoo.testing.vision_census` (its configs in :mod:`ppzoo.testing.vision_zoo_configs`).
"""

from ppzoo.testing.image_batches import image_batch
from ppzoo.testing.tiny_vision_configs import VISION_TYPES, tiny_vision_config
from ppzoo.testing.vision_census import VISION_RESULTS, VisionResult, render_vision, vision_model_types, vision_zoo
from ppzoo.testing.vision_step import save_tiny_vision_model, vision_step_problems

__all__ = [
    "VISION_RESULTS",
    "VISION_TYPES",
    "VisionResult",
    "image_batch",
    "render_vision",
    "save_tiny_vision_model",
    "tiny_vision_config",
    "vision_model_types",
    "vision_step_problems",
    "vision_zoo",
]
