"""Contact sheets: the query and its neighbours as captioned thumbnails, as a PNG or a
self-contained HTML page, because people would rather look at search results than read them.

Layout (PNG): tiles of THUMB x THUMB pixels plus a CAPTION-pixel caption, COLUMNS per row, PAD
pixels around and between them; the query is the first tile, framed in QUERY_COLOR. A tile whose
image cannot be read (missing file, non-file URI, undecodable) is drawn as a grey placeholder.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from PIL import Image, ImageDraw, ImageFont, ImageOps

from moco_retrieval.images import ImageDecodeError, decode_image

THUMB = 128
CAPTION = 34
PAD = 8
COLUMNS = 6
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (205, 205, 205)
QUERY_COLOR = (220, 60, 40)
TEXT = (20, 20, 20)


@dataclass(frozen=True)
class Tile:
    """One thumbnail: `image` is None for a placeholder; two caption lines."""

    image: Image.Image | None
    title: str
    caption: str


def sheet_size(n_tiles: int) -> tuple[int, int]:
    """(width, height) in pixels of a PNG sheet with `n_tiles` tiles (query included)."""
    cols = max(1, min(COLUMNS, n_tiles))
    rows = max(1, math.ceil(n_tiles / cols))
    return cols * (THUMB + PAD) + PAD, rows * (THUMB + CAPTION + PAD) + PAD


def uri_path(uri: str) -> Path | None:
    """The local path of a file:// URI or a plain path; None for other schemes."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    return Path(uri) if parsed.scheme == "" else None


def load_thumbnail(source: str | Path | bytes | None) -> Image.Image | None:
    """A THUMB-bounded RGB thumbnail of a URI, path or encoded bytes; None if it cannot be read."""
    if source is None:
        return None
    if isinstance(source, str):
        source = uri_path(source)
        if source is None:
            return None
    try:
        img = decode_image(source)
    except (ImageDecodeError, OSError):
        return None
    return ImageOps.contain(
        img, (THUMB, THUMB), Image.Resampling.NEAREST if max(img.size) < THUMB else Image.Resampling.LANCZOS
    )


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_png(tiles: list[Tile]) -> Image.Image:
    width, height = sheet_size(len(tiles))
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    cols = max(1, min(COLUMNS, len(tiles)))
    for i, tile in enumerate(tiles):
        x = PAD + (i % cols) * (THUMB + PAD)
        y = PAD + (i // cols) * (THUMB + CAPTION + PAD)
        if tile.image is None:
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=PLACEHOLDER)
            draw.text((x + THUMB // 2, y + THUMB // 2), "no image", fill=TEXT, font=font, anchor="mm")
        else:
            img = tile.image
            sheet.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        if i == 0:
            draw.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=QUERY_COLOR, width=3)
        draw.text((x, y + THUMB + 3), _fit(draw, tile.title, font, THUMB), fill=TEXT, font=font)
        draw.text((x, y + THUMB + 18), _fit(draw, tile.caption, font, THUMB), fill=TEXT, font=font)
    return sheet


def render_html(tiles: list[Tile], title: str = "Search results") -> str:
    """A self-contained page: thumbnails inlined as base64 PNG."""
    figures = []
    for i, tile in enumerate(tiles):
        if tile.image is None:
            visual = '<div class="ph">no image</div>'
        else:
            buf = io.BytesIO()
            tile.image.save(buf, format="PNG")
            visual = f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'
        cls = ' class="query"' if i == 0 else ""
        figures.append(
            f"<figure{cls}>{visual}<figcaption><b>{html.escape(tile.title)}</b><br>"
            f"{html.escape(tile.caption)}</figcaption></figure>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: {PAD}px; }}
figure {{ margin: 0; width: {THUMB}px; }}
figure img, .ph {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; image-rendering: pixelated; }}
.ph {{ background: rgb{PLACEHOLDER}; display: flex; align-items: center; justify-content: center; }}
.query img, .query .ph {{ outline: 3px solid rgb{QUERY_COLOR}; }}
figcaption {{ font-size: 12px; overflow-wrap: anywhere; }}
</style></head>
<body><h1>{html.escape(title)}</h1><div class="grid">
{chr(10).join(figures)}
</div></body></html>
"""


def write_sheet(path: str | Path, tiles: list[Tile], title: str = "Search results") -> Path:
    """Write a PNG (or any raster format Pillow knows by suffix) or, for .html/.htm, a page."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        path.write_text(render_html(tiles, title), encoding="utf-8")
    elif path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        render_png(tiles).save(path)
    else:
        raise ValueError(f"{path}: unsupported sheet format (use .png, .jpg, .webp or .html)")
    return path
