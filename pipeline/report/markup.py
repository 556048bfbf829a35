"""HTML pieces of the report page: escaping, the missing-input line, inlined images, number formats, the style.

Everything the page shows is inlined (``data:`` URIs, one ``<style>`` element), so the page opens offline.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1240px; }
h1 { font-size: 24px; } h2 { font-size: 19px; border-bottom: 1px solid #ccc; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.details { font-size: 11px; color: #555; max-width: 520px; }
.missing { color: #a40000; background: #fff3f3; border-left: 4px solid #d33; padding: 4px 8px; }
.note { color: #555; font-size: 12px; } .na { color: #999; font-size: 11px; }
img.plot { max-width: 100%; } img.tile { height: 144px; display: block; }
.swatch { display: inline-block; margin-right: 10px; font-size: 12px; }
.chip { display: inline-block; width: 12px; height: 12px; margin-right: 3px; border: 1px solid #888; }
"""


def escape(value: Any) -> str:
    """``str(value)`` safe inside HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def missing_line(text: str) -> str:
    """The one red line that stands in for a section or column whose input is missing or unreadable."""
    return f'<p class="missing">{escape(text)}</p>'


def png_data_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def img_tag(png_bytes: bytes, alt: str, css_class: str = "") -> str:
    """An ``<img>`` holding the PNG itself (no file beside the page)."""
    class_attr = f' class="{css_class}"' if css_class else ""
    return f'<img{class_attr} alt="{escape(alt)}" src="{png_data_uri(png_bytes)}">'


def format_fraction(value: Any) -> str:
    """A fraction (mIoU, IoU) as a percentage with one decimal; ``None`` as a dash, anything else escaped."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—" if value is None else escape(value)
    return f"{100.0 * value:.1f}"


def format_scalar(value: Any) -> str:
    """A metrics-file scalar for the details column: floats to 4 significant digits, the rest escaped."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(value)
