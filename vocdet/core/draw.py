"""Drawing detections: labelled boxes in Ultralytics' palette, with Pillow's bundled font."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from vocdet.core.detections import Detection
from vocdet.core.images import ImageInput, load_image

# Ultralytics' default palette, so plots look familiar.
_PALETTE = (
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
)  # fmt: skip


def class_colour(class_id: int) -> tuple[int, int, int]:
    h = _PALETTE[class_id % len(_PALETTE)]
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def plot(image: ImageInput, detections: Sequence[Detection], *, line_width: int | None = None) -> Image.Image:
    """Draw labelled boxes on a copy of ``image``; returns an RGB PIL image.

    The label font is the FreeType font bundled with Pillow (no download, no system fonts needed).
    """
    canvas = Image.fromarray(load_image(image))
    draw = ImageDraw.Draw(canvas)
    lw = line_width or max(round(sum(canvas.size) / 2 * 0.003), 2)
    font = ImageFont.load_default(size=max(lw * 6, 12))
    for d in sorted(detections, key=lambda d: d.score):  # best on top
        colour = class_colour(d.class_id)
        x1, y1, x2, y2 = d.box
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
        text = f"{d.label} {d.score:.2f}"
        left, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - left + 2 * lw, b - t + 2 * lw
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside when at the top edge
        draw.rectangle((x1, ty, x1 + tw, ty + th), fill=colour)
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x1 + lw - left, ty + lw - t), text, fill=(0, 0, 0) if luma > 150 else (255, 255, 255), font=font)
    return canvas
