"""Reading a world image's attributes (shape, object colour, background) with the evaluators.

Two readers, one per shipped model that can name attributes:

- **CLIP zero-shot** (:func:`clip_readings`): the image's embedding is compared with those of
  all 90 full captions ("a red circle on a blue background"); the nearest caption's
  attributes are the reading (so CLIP's caption retrieval top-1 is "all three right");
- **ViT heads** (:class:`hra_diffusion.eval.models.AttributeReader`): the attribute ViT's
  arg-max per attribute.

:func:`attribute_accuracy` scores readings against the scenes that were asked for.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from hra_diffusion import world
from hra_diffusion.eval.images import batched
from hra_diffusion.eval.models import ClipEncoder
from hra_diffusion.eval.similarity import cosine_matrix
from hra_diffusion.world.evaluators import ATTRIBUTES, all_full_captions

Reading = dict[str, str | None]


def clip_readings(clip: ClipEncoder, images: list[Image.Image], batch_size: int) -> list[Reading]:
    """Attributes of the full caption nearest to each image in CLIP's embedding space."""
    table = all_full_captions()
    text = clip.encode_texts([caption for _, caption in table])  # (90, E)
    readings: list[Reading] = []
    for batch in batched(images, batch_size):
        similarity = cosine_matrix(clip.encode_images(list(batch)), text)  # (b, 90)
        for row in similarity.argmax(dim=1).tolist():
            scene = table[row][0]
            readings.append({name: getattr(scene, name) for name in ATTRIBUTES})
    return readings


def attribute_accuracy(readings: list[Reading], scenes: list[world.Scene]) -> dict[str, float]:
    """Share of readings whose shape, colour and background (and all three) match the scene."""
    if len(readings) != len(scenes) or not scenes:
        raise ValueError("Need one reading per scene, and at least one of each.")
    hits = {
        name: [r[name] == getattr(s, name) for r, s in zip(readings, scenes, strict=True)]
        for name in ATTRIBUTES
    }
    result = {name: float(np.mean(h)) for name, h in hits.items()}
    result["all"] = float(np.mean([all(h[i] for h in hits.values()) for i in range(len(scenes))]))
    return result


def agreement(a: list[Reading], b: list[Reading]) -> dict[str, float]:
    """Share of images on which two readers agree, per attribute."""
    return {
        name: float(np.mean([x[name] == y[name] for x, y in zip(a, b, strict=True)]))
        for name in ATTRIBUTES
    }
