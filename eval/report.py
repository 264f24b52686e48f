"""Result files: JSON (every number and setting), a Markdown table, PNG contact sheets and
bar charts drawn with Pillow.

JSON has no NaN: undefined values (e.g. a class absent from the whole set) are written as null.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from importlib import metadata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from hra_diffusion.eval.errors import EvaluationError

PACKAGES = (
    "hra-diffusion",
    "torch",
    "torchvision",
    "transformers",
    "diffusers",
    "clip-anytorch",
    "lpips",
    "opencv-python-headless",
    "numpy",
    "Pillow",
)
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that influence the scores (None if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """A driver's own arguments and the training options after ``--`` (empty without one):
    ``split_passthrough(["--tasks", "canny", "--", "--hra_r", "4"])`` is
    ``(["--tasks", "canny"], ["--hra_r", "4"])``."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    """``--overwrite_output_dir``: replace the results of a finished evaluation."""
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="replace the results of a finished evaluation (an --output_dir holding "
        "results.json); refused without it",
    )


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an ``--output_dir`` holding ``results.json`` (a finished evaluation)."""
    if (Path(output_dir) / "results.json").exists() and not overwrite:
        raise EvaluationError(
            f"--output_dir {output_dir} holds a finished evaluation (results.json); pass "
            "--overwrite_output_dir to replace it, or choose another --output_dir."
        )


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, NaN/inf replaced by null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, "–" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def fmt_stat(stat: dict, digits: int = 3) -> str:
    """``mean ± std`` of a :func:`~hra_diffusion.eval.similarity.mean_std` dict."""
    return f"{fmt(stat['mean'], digits)} ± {fmt(stat['std'], digits)}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def contact_sheet(
    rows: list[list[tuple[Image.Image, str]]], path: Path, title: str, tile: int = 192
) -> None:
    """Grid PNG: one row per sample, each cell an image (scaled to fit tile × tile) and a caption.

    Text is drawn with Pillow's default font: keep titles and captions to plain ASCII.
    """
    font, title_font = _font(13), _font(16)
    caption_h, pad, title_h = 4 * 16 + 6, 8, 30
    columns = max(len(row) for row in rows)
    width = pad + columns * (tile + pad)
    height = title_h + len(rows) * (tile + caption_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 7), title, fill="black", font=title_font)
    for r, row in enumerate(rows):
        top = title_h + r * (tile + caption_h + pad)
        for c, (image, caption) in enumerate(row):
            left = pad + c * (tile + pad)
            thumb = ImageOps.contain(image.convert("RGB"), (tile, tile))
            sheet.paste(thumb, (left + (tile - thumb.width) // 2, top + (tile - thumb.height) // 2))
            for i, line in enumerate(_wrap(draw, caption, font, tile, 4)):
                draw.text((left, top + tile + 3 + 16 * i), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def bar_chart(
    runs: dict[str, dict[str, float | None]], metrics: list[str], path: Path, title: str
) -> None:
    """Grouped bar chart PNG: one panel per metric (own y-scale from 0), one bar per run."""
    font, title_font = _font(13), _font(16)
    panel_w, panel_h, pad, legend_h = 60 + 46 * len(runs), 240, 24, 22 * len(runs) + 10
    width = pad + len(metrics) * (panel_w + pad)
    height = 40 + legend_h + panel_h + 50
    chart = Image.new("RGB", (max(width, 360), height), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((pad, 10), title, fill="black", font=title_font)
    for i, label in enumerate(runs):
        y = 40 + 22 * i
        draw.rectangle((pad, y + 2, pad + 14, y + 16), fill=PALETTE[i % len(PALETTE)])
        draw.text((pad + 22, y + 1), label, fill="black", font=font)
    base = 40 + legend_h + panel_h
    for m, metric in enumerate(metrics):
        left = pad + m * (panel_w + pad)
        values = [runs[label].get(metric) for label in runs]
        top_value = max((v for v in values if v is not None and math.isfinite(v)), default=0.0)
        scale = (panel_h - 30) / top_value if top_value > 0 else 0.0
        draw.line((left, base, left + panel_w, base), fill="black")
        for i, value in enumerate(values):
            x0 = left + 30 + 46 * i
            if value is None or not math.isfinite(value):
                draw.text((x0, base - 18), "n/a", fill="black", font=font)
                continue
            y0 = base - max(value * scale, 1)
            draw.rectangle((x0, y0, x0 + 32, base), fill=PALETTE[i % len(PALETTE)])
            draw.text((x0 - 4, y0 - 17), fmt(value), fill="black", font=font)
        name_w = draw.textlength(metric, font=font)
        draw.text((left + (panel_w - name_w) / 2, base + 8), metric, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    chart.save(path)
