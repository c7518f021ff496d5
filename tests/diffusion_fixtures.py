"""Small image-caption samples for the diffusion task and stage tests (PIL only, seeded)."""

from __future__ import annotations

import io
import random

from PIL import Image

from batctl.data import Sample

WORDS = "a photo of dog cat with red hat house by the sea portrait painting blue car".split()


def image(seed: int, width: int = 40, height: int = 48) -> Image.Image:
    """A random-looking but smooth RGB image: a few coloured rectangles on a coloured ground."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = rng.randrange(x0, width + 1), rng.randrange(y0, height + 1)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, x1, y1))
    return img


def image_samples(n: int, seed: int = 0, prefix: str = "img") -> list[Sample]:
    """``n`` samples with an image (sizes vary, some wide, some tall) and a caption each.

    ``raw`` holds the PNG and the caption in webdataset layout, as the readers would give them.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = rng.choice([(40, 48), (48, 40), (32, 32), (64, 36), (36, 64)])
        img = image(seed * 1000 + i, w, h)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        png = io.BytesIO()
        img.save(png, format="PNG")
        out.append(
            Sample(
                key=f"{prefix}-{i:03d}",
                part=0,
                offset=i,
                raw={"png": png.getvalue(), "txt": caption.encode()},
                record={"image": img, "caption": caption},
            )
        )
    return out
