"""Preview: one picture of a shard set, drawn with PIL alone.

A header with the totals, a bar chart of samples per bucket, a histogram of caption token
lengths, and a contact sheet with the first few samples of every bucket and their captions.
Thumbnails come from the stored images (cropped as they were encoded), from the latents
decoded through a VAE (``--decode-with``), or, when a build left its images out, from the
latents' first channels drawn as colours, which the header says.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import ShardFormatError, ShardkitError
from .format import LATENT, METADATA, TEXT, parse_metadata, read_npy
from .images import to_rgb
from .manifest import ShardSet
from .report import human_bytes
from .summary import summarize, token_length_stats

log = logging.getLogger(__name__)

STORED_IMAGES = "stored_images"
VAE_DECODE = "vae_decode"
LATENT_CHANNELS = "latent_channels"

# Colours. BAR_COLOUR is used for the bucket bars and nothing else, so the bars can be measured.
BACKGROUND = (248, 248, 246)
PANEL = (255, 255, 255)
BORDER = (216, 220, 226)
GRID = (234, 236, 240)
INK = (33, 37, 41)
MUTED = (108, 116, 125)
THUMB_BACKGROUND = (232, 235, 239)
BAR_COLOUR = (52, 120, 198)
FIELD_COLOURS = ((232, 131, 44), (46, 164, 99), (142, 84, 186), (214, 69, 99))
ALERT = (196, 43, 43)

# Layout, in pixels.
MARGIN = 28
GAP = 18
HEADER_H = 78
CHART_H = 290
SECTION_H = 36
THUMB = 128  # thumbnails fit a THUMB x THUMB box, keeping their bucket's aspect ratio
THUMB_GAP = 10
CARD_PAD = 10
CARD_LABEL_H = 30
CAPTION_LINE_H = 13
CAPTION_LINES = 3
CARD_H = CARD_PAD + CARD_LABEL_H + THUMB + 6 + CAPTION_LINES * CAPTION_LINE_H + CARD_PAD
MIN_CARD_W = 300
MIN_WIDTH = 1200
# Plot area inside a chart panel: room for the title and legend above, axis labels left and below.
PLOT_INSET = (52, 58, 18, 42)  # left, top, right, bottom

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass
class PreviewLayout:
    width: int
    height: int
    header: Box
    bar_panel: Box
    bar_plot: Box
    bar_slots: list[Box]  # per bucket, in bucket order: the column its bar may fill
    histogram_panel: Box
    histogram_plot: Box
    sheet: Box
    columns: int  # bucket cards side by side in the contact sheet
    cards: list[Box]  # per bucket
    thumbs: list[list[Box]]  # per bucket, per thumbnail slot


def preview_layout(n_buckets: int, thumbs_per_bucket: int) -> PreviewLayout:
    """Where everything goes: header, the two charts side by side, then a grid of one card per bucket."""
    card_min = max(MIN_CARD_W, 2 * CARD_PAD + thumbs_per_bucket * (THUMB + THUMB_GAP) - THUMB_GAP)
    width = max(MIN_WIDTH, 2 * MARGIN + card_min)
    content = width - 2 * MARGIN
    header = (MARGIN, MARGIN, width - MARGIN, MARGIN + HEADER_H)
    charts_top = header[3] + GAP
    panel_w = (content - GAP) // 2
    bar_panel = (MARGIN, charts_top, MARGIN + panel_w, charts_top + CHART_H)
    histogram_panel = (MARGIN + panel_w + GAP, charts_top, width - MARGIN, charts_top + CHART_H)

    def plot(panel: Box) -> Box:
        return (panel[0] + PLOT_INSET[0], panel[1] + PLOT_INSET[1], panel[2] - PLOT_INSET[2], panel[3] - PLOT_INSET[3])

    bar_plot = plot(bar_panel)
    slot = (bar_plot[2] - bar_plot[0]) / max(n_buckets, 1)
    bar_slots = [(bar_plot[0] + round(i * slot), bar_plot[1], bar_plot[0] + round((i + 1) * slot), bar_plot[3])
                 for i in range(n_buckets)]
    columns = max(1, (content + GAP) // (card_min + GAP))
    card_w = (content - (columns - 1) * GAP) // columns
    sheet_top = bar_panel[3] + GAP + SECTION_H
    cards, thumbs = [], []
    for i in range(n_buckets):
        x0 = MARGIN + (i % columns) * (card_w + GAP)
        y0 = sheet_top + (i // columns) * (CARD_H + GAP)
        cards.append((x0, y0, x0 + card_w, y0 + CARD_H))
        tx, ty = x0 + CARD_PAD, y0 + CARD_PAD + CARD_LABEL_H
        thumbs.append([(tx + j * (THUMB + THUMB_GAP), ty, tx + j * (THUMB + THUMB_GAP) + THUMB, ty + THUMB)
                       for j in range(thumbs_per_bucket)])
    rows = max(1, math.ceil(n_buckets / columns))
    height = sheet_top + rows * (CARD_H + GAP) - GAP + MARGIN
    return PreviewLayout(width=width, height=height, header=header, bar_panel=bar_panel, bar_plot=bar_plot,
                         bar_slots=bar_slots, histogram_panel=histogram_panel, histogram_plot=plot(histogram_panel),
                         sheet=(MARGIN, sheet_top - SECTION_H, width - MARGIN, height - MARGIN), columns=columns,
                         cards=cards, thumbs=thumbs)


@dataclass
class Thumbnail:
    key: str
    caption: str
    picture: Image.Image | None  # RGB at the bucket's aspect ratio; None if it could not be made


@dataclass
class PreviewResult:
    path: str
    thumbnail_source: str  # STORED_IMAGES, VAE_DECODE or LATENT_CHANNELS
    note: str  # how the thumbnails were made, as the picture says it
    width: int
    height: int
    buckets: int
    thumbnails: int
    layout: PreviewLayout = field(repr=False)

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "thumbnail_source": self.thumbnail_source, "note": self.note, "width": self.width,
                "height": self.height, "buckets": self.buckets, "thumbnails": self.thumbnails}

    def describe(self) -> str:
        return (f"wrote {self.path} ({self.width}x{self.height}, {self.thumbnails} thumbnails of {self.buckets} "
                f"buckets; {self.note})")


# ---- fonts and text ----------------------------------------------------------------------

_FONTS: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _text_width(text: str, font) -> float:
    return font.getlength(text)


def _fit_text(text: str, font, width: float) -> str:
    """text, cut with an ellipsis so it fits width."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "…", font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font, width: float, lines: int) -> list[str]:
    """Word-wrap into at most ``lines`` lines; the last one ends with an ellipsis if text is left over."""
    words = " ".join(text.split()).split(" ")
    out: list[str] = []
    current = ""
    for i, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if _text_width(candidate, font) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        current = word
        if len(out) == lines - 1:
            rest = " ".join([current, *words[i + 1:]])
            out.append(_fit_text(rest, font, width))
            return out
    if current:
        out.append(_fit_text(current, font, width))
    return out[:lines]


# ---- thumbnails --------------------------------------------------------------------------

def _first_samples(shard_set: ShardSet, bucket: str, count: int) -> list[tuple[str, dict[str, bytes]]]:
    """The first ``count`` samples of a bucket, in shard order, reading no further than needed."""
    found: list[tuple[str, dict[str, bytes]]] = []
    for entry in sorted((e for e in shard_set.manifest.shards if e.bucket == bucket), key=lambda e: e.path):
        try:
            for sample in shard_set.samples(entry):
                found.append((sample.key, sample.members))
                if len(found) >= count:
                    return found
        except (OSError, EOFError, ShardFormatError) as exc:  # a broken shard leaves gaps; --verify names it
            log.warning("cannot read %s for the preview (%s); its samples are left out", entry.path, exc)
    return found


def _metadata(key: str, members: dict[str, bytes]) -> dict:
    try:
        return parse_metadata(members.get(METADATA, b"{}"), key)
    except ShardFormatError:
        return {}


def _caption(members: dict[str, bytes], meta: dict, primary: str) -> str:
    caption = (meta.get("captions") or {}).get(primary) if isinstance(meta.get("captions"), dict) else None
    if caption is None:
        caption = bytes(members.get(TEXT, b"")).decode("utf-8", errors="replace")
    return caption


def _load_latent(key: str, members: dict[str, bytes]) -> np.ndarray | None:
    try:
        latent = read_npy(members[LATENT], f"{key}.{LATENT}")
    except (KeyError, ShardFormatError):
        return None
    return latent if latent.ndim == 3 else None


def _stored_picture(members: dict[str, bytes], meta: dict, bucket_hw: list[int]) -> Image.Image | None:
    """The stored image resized and cropped as it was encoded, at thumbnail scale."""
    data = members.get(str(meta.get("image_ext")))
    if not data:
        return None
    height, width = bucket_hw
    scale = THUMB / max(height, width)
    resized, top, left = meta.get("resized_hw"), meta.get("crop_top"), meta.get("crop_left")
    known_crop = (isinstance(resized, list) and len(resized) == 2 and all(isinstance(v, int) and v > 0 for v in resized)
                  and isinstance(top, int) and isinstance(left, int))
    side = max(THUMB, *(round(v * scale) for v in resized)) if known_crop else THUMB
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", (side, side))  # JPEGs decode at a reduced scale: a thumbnail needs no more
            image = to_rgb(ImageOps.exif_transpose(opened))
            image.load()
    except Exception as exc:  # PIL raises many types for damaged data; a gap, not a failure
        log.warning("cannot decode the image of %s for the preview (%s)", meta.get("key"), exc)
        return None
    if known_crop:
        size = (max(1, round(resized[1] * scale)), max(1, round(resized[0] * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        x0, y0 = round(left * scale), round(top * scale)
        return image.crop((x0, y0, x0 + max(1, round(width * scale)), y0 + max(1, round(height * scale))))
    return ImageOps.fit(image, (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def _latent_picture(latent: np.ndarray, channels: int) -> Image.Image:
    """The posterior mean's first three channels as RGB, each stretched over its 1st-99th percentile."""
    mean = np.nan_to_num(latent[:channels].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    picks = [mean[i % mean.shape[0]] for i in range(3)]
    planes = []
    for plane in picks:
        low, high = np.percentile(plane, [1, 99])
        scaled = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
        planes.append(np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8))
    return Image.fromarray(np.stack(planes, axis=-1), "RGB")


class _VaeDecoder:
    """Decodes latents' posterior means to pictures (``--decode-with``)."""

    def __init__(self, source: str, subfolder: str | None, latent_channels: int):
        import torch
        from diffusers import AutoencoderKL

        from .encoders import load_error, quiet_hub_logging, resolve_device

        self.torch = torch
        self.device = resolve_device("auto")
        try:
            with quiet_hub_logging():
                self.model = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=torch.float32)
        except Exception as exc:  # hub, file and format errors all mean "not a usable VAE"
            raise load_error("VAE", source, "--decode-with (and --decode-subfolder)", exc) from None
        channels = int(self.model.config.latent_channels)
        if channels != latent_channels:
            raise ShardkitError(f"the VAE at {source} has {channels} latent channels, the shards hold {latent_channels}; "
                                f"pass --decode-with the VAE the set was built with")
        self.model.to(self.device).eval().requires_grad_(False)
        self.channels = channels

    def decode(self, latents: list[np.ndarray]) -> list[Image.Image]:
        torch = self.torch
        means = np.stack([np.nan_to_num(latent[:self.channels].astype(np.float32)) for latent in latents])
        with torch.inference_mode():
            pixels = self.model.decode(torch.from_numpy(means).to(self.device)).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p, "RGB") for p in pixels]


def _thumbnails(shard_set: ShardSet, bucket: str, bucket_hw: list[int], count: int, source: str,
                decoder: _VaeDecoder | None) -> list[Thumbnail]:
    primary = shard_set.config["captions"][0]
    channels = int(shard_set.manifest.encoders["vae"]["latent_channels"])
    samples = _first_samples(shard_set, bucket, count)
    thumbs: list[Thumbnail] = []
    latents: list[tuple[int, np.ndarray]] = []
    for key, members in samples:
        meta = _metadata(key, members)
        picture = None
        if source == STORED_IMAGES:
            picture = _stored_picture(members, meta, bucket_hw)
        else:
            latent = _load_latent(key, members)
            if latent is not None and source == LATENT_CHANNELS:
                picture = _latent_picture(latent, channels)
            elif latent is not None:
                latents.append((len(thumbs), latent))
        thumbs.append(Thumbnail(key=key, caption=_caption(members, meta, primary), picture=picture))
    if decoder is not None and latents:
        shapes = {latent.shape for _, latent in latents}
        for shape in shapes:  # one batch per shape; a bucket's latents share one unless damaged
            group = [(i, latent) for i, latent in latents if latent.shape == shape]
            for (i, _), picture in zip(group, decoder.decode([latent for _, latent in group])):
                thumbs[i].picture = picture
    return thumbs


# ---- drawing -----------------------------------------------------------------------------

def _panel(draw: ImageDraw.ImageDraw, box: Box, title: str) -> None:
    draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=6, fill=PANEL, outline=BORDER)
    draw.text((box[0] + 14, box[1] + 11), title, fill=INK, font=_font(15))


def _y_axis(draw: ImageDraw.ImageDraw, plot: Box, top_value: int) -> None:
    """Grid lines at 0, half and the top value, labelled on the left."""
    x0, y0, x1, y1 = plot
    for fraction in (0.0, 0.5, 1.0):
        y = round(y1 - fraction * (y1 - y0))
        draw.line((x0, y, x1 - 1, y), fill=GRID if fraction else BORDER)
        value = top_value * fraction
        label = f"{value:,g}" if value != int(value) else f"{int(value):,}"
        draw.text((x0 - 8, y), label, fill=MUTED, font=_font(11), anchor="rm")


def axis_top(value: int) -> int:
    """The top of a count axis: a round number >= value whose half (the middle grid line) is whole."""
    value = max(int(value), 1)
    magnitude = 10 ** (len(str(value)) - 1)
    steps = (m * magnitude for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10))
    return next(int(top) for top in steps if top >= value and top == int(top) and int(top) % 2 == 0)


def _draw_bars(draw: ImageDraw.ImageDraw, layout: PreviewLayout, buckets) -> None:
    _panel(draw, layout.bar_panel, "samples per bucket")
    plot = layout.bar_plot
    if not buckets:
        draw.text(((plot[0] + plot[2]) // 2, (plot[1] + plot[3]) // 2), "no samples", fill=MUTED, font=_font(13), anchor="mm")
        return
    top = axis_top(max(b.samples for b in buckets))
    _y_axis(draw, plot, top)
    label_font, count_font = _font(11), _font(10)
    widest = max(_text_width(b.bucket, label_font) for b in buckets) + 6
    slot_w = (plot[2] - plot[0]) / len(buckets)
    label_every = max(1, math.ceil(widest / slot_w))
    # Counts above the bars only when every one of them fits its column.
    show_counts = all(_text_width(str(b.samples), count_font) + 2 < slot_w for b in buckets)
    for i, (bucket, slot) in enumerate(zip(buckets, layout.bar_slots)):
        x0, _, x1, y1 = slot
        pad = max(1, round((x1 - x0) * 0.18))
        bar_height = round(bucket.samples / top * (plot[3] - plot[1]))
        if bar_height > 0:
            draw.rectangle((x0 + pad, y1 - bar_height, x1 - pad - 1, y1 - 1), fill=BAR_COLOUR)
        centre = (x0 + x1) / 2
        if show_counts:
            draw.text((centre, y1 - bar_height - 3), str(bucket.samples), fill=INK, font=count_font, anchor="md")
        if i % label_every == 0:
            draw.text((centre, y1 + 6), bucket.bucket, fill=MUTED, font=label_font, anchor="ma")
    draw.text(((plot[0] + plot[2]) / 2, plot[3] + 24), "aspect bucket (height / width)", fill=MUTED, font=_font(11), anchor="ma")


def _draw_histogram(draw: ImageDraw.ImageDraw, layout: PreviewLayout, histograms: dict[str, dict[str, int]],
                    max_length: int) -> None:
    _panel(draw, layout.histogram_panel, "caption length (T5 tokens)")
    plot = layout.histogram_plot
    histograms = {name: h for name, h in histograms.items() if sum(int(c) for c in h.values())}
    if not histograms or max_length < 1:
        draw.text(((plot[0] + plot[2]) // 2, (plot[1] + plot[3]) // 2), "no captions", fill=MUTED, font=_font(13), anchor="mm")
        return
    bins = min(40, max_length)
    per_bin = math.ceil(max_length / bins)
    bins = math.ceil(max_length / per_bin)
    counts = {name: np.zeros(bins, dtype=np.int64) for name in histograms}
    for name, histogram in histograms.items():
        for length, count in histogram.items():
            counts[name][min(bins - 1, max(0, (int(length) - 1) // per_bin))] += int(count)
    top = axis_top(int(max(c.max() for c in counts.values())))
    _y_axis(draw, plot, top)
    x0, y0, x1, y1 = plot
    bin_w = (x1 - x0) / bins
    fields = list(counts)
    for b in range(bins):
        left = x0 + b * bin_w
        sub_w = max(1.0, (bin_w - 1) / len(fields))
        for f, name in enumerate(fields):
            value = counts[name][b]
            if value:
                h = max(1, round(value / top * (y1 - y0)))
                draw.rectangle((round(left + f * sub_w), y1 - h, max(round(left + f * sub_w), round(left + (f + 1) * sub_w) - 1),
                                y1 - 1), fill=FIELD_COLOURS[f % len(FIELD_COLOURS)])
    for tick in (0, max_length // 4, max_length // 2, 3 * max_length // 4, max_length):
        x = x0 + tick / (bins * per_bin) * (x1 - x0)
        draw.line((x, y1, x, y1 + 4), fill=MUTED)
        draw.text((x, y1 + 6), str(tick), fill=MUTED, font=_font(11), anchor="ma")
    # max_length marks where captions were truncated.
    x_max = x0 + (max_length - 0.5) / (bins * per_bin) * (x1 - x0)
    for y in range(y0, y1, 8):
        draw.line((x_max, y, x_max, min(y + 4, y1)), fill=ALERT, width=1)
    stats = [token_length_stats(name, h, max_length) for name, h in histograms.items()]
    truncated = sum(s.truncated for s in stats if s)
    panel = layout.histogram_panel
    draw.text((panel[2] - 14, panel[1] + 13), f"{truncated} truncated at max_length {max_length}",
              fill=ALERT, font=_font(12), anchor="ra")
    # Legend: one entry per caption field, in a row between the title and the plot.
    legend_font = _font(11)
    entries = [(FIELD_COLOURS[f % len(FIELD_COLOURS)], f"{s.field}: median {s.median:g}, p95 {s.p95}, max {s.max}")
               for f, s in enumerate(stats) if s is not None]
    if sum(_text_width(text, legend_font) + 30 for _, text in entries) > panel[2] - panel[0] - 28:
        entries = [(colour, text.split(":")[0]) for colour, text in entries]
    lx, ly = panel[0] + 14, panel[1] + 36
    for colour, text in entries:
        draw.rectangle((lx, ly - 4, lx + 9, ly + 5), fill=colour)
        draw.text((lx + 14, ly), text, fill=INK, font=legend_font, anchor="lm")
        lx += 14 + _text_width(text, legend_font) + 16
    draw.text(((x0 + x1) / 2, y1 + 24), "tokens per caption, end-of-sequence included", fill=MUTED, font=_font(11), anchor="ma")


def _draw_header(draw: ImageDraw.ImageDraw, layout: PreviewLayout, shard_set: ShardSet, note: str, source: str) -> None:
    summary = summarize(shard_set)
    x, y = layout.header[0], layout.header[1]
    name = shard_set.url.rstrip("/").rsplit("/", 1)[-1] or shard_set.url
    draw.text((x, y), f"shardkit · {name}", fill=INK, font=_font(24))
    facts = (f"{summary.samples:,} samples · {summary.shards:,} shards · {human_bytes(summary.bytes)} · "
             f"{len(summary.buckets)} buckets · resolution {summary.resolution} · "
             f"captions {', '.join(shard_set.config.get('captions', []))} · status {summary.status}")
    draw.text((x, y + 34), _fit_text(facts, _font(14), layout.header[2] - x), fill=INK, font=_font(14))
    draw.text((x, y + 56), _fit_text(note, _font(13), layout.header[2] - x),
              fill=ALERT if source == LATENT_CHANNELS else MUTED, font=_font(13))
    draw.line((layout.header[0], layout.header[3] - 1, layout.header[2], layout.header[3] - 1), fill=BORDER)


def _paste_fitted(canvas: Image.Image, picture: Image.Image, box: Box, resample) -> None:
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(width / picture.width, height / picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    fitted = picture.resize(size, resample)
    canvas.paste(fitted, (box[0] + (width - size[0]) // 2, box[1] + (height - size[1]) // 2))


def _draw_sheet(canvas: Image.Image, draw: ImageDraw.ImageDraw, layout: PreviewLayout, buckets,
                thumbnails: list[list[Thumbnail]], thumbs_per_bucket: int, source: str) -> None:
    draw.text((layout.sheet[0], layout.sheet[1] + 6), f"first {thumbs_per_bucket} sample{'s' if thumbs_per_bucket != 1 else ''}"
              f" of each bucket, captions underneath", fill=INK, font=_font(17))
    resample = Image.Resampling.NEAREST if source == LATENT_CHANNELS else Image.Resampling.LANCZOS
    caption_font = _font(11)
    for bucket, card, boxes, thumbs in zip(buckets, layout.cards, layout.thumbs, thumbnails):
        draw.rounded_rectangle((card[0], card[1], card[2] - 1, card[3] - 1), radius=6, fill=PANEL, outline=BORDER)
        x, y = card[0] + CARD_PAD, card[1] + CARD_PAD
        draw.text((x, y + 20), bucket.bucket, fill=INK, font=_font(20), anchor="ls")
        details = (f"{bucket.height} x {bucket.width} px · {bucket.samples:,} sample{'s' if bucket.samples != 1 else ''} · "
                   f"{bucket.shards} shard{'s' if bucket.shards != 1 else ''} · {human_bytes(bucket.bytes)}")
        key_w = _text_width(bucket.bucket, _font(20)) + 12
        draw.text((x + key_w, y + 20), _fit_text(details, _font(12), card[2] - CARD_PAD - x - key_w),
                  fill=MUTED, font=_font(12), anchor="ls")
        if not thumbs:
            draw.text(((card[0] + card[2]) // 2, boxes[0][1] + THUMB // 2), "no readable samples: run inspect --verify",
                      fill=ALERT, font=_font(12), anchor="mm")
        for box, thumb in zip(boxes, thumbs):
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=THUMB_BACKGROUND)
            if thumb.picture is not None:
                _paste_fitted(canvas, thumb.picture, box, resample)
            else:
                draw.text(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), "no picture", fill=MUTED,
                          font=_font(11), anchor="mm")
            for n, line in enumerate(_wrap(thumb.caption, caption_font, THUMB, CAPTION_LINES)):
                draw.text((box[0], box[3] + 5 + n * CAPTION_LINE_H), line, fill=INK, font=caption_font)


def render_preview(shard_set: ShardSet, destination: str, thumbs_per_bucket: int = 4, decode_with: str | None = None,
                   decode_subfolder: str | None = None) -> PreviewResult:
    """Draw the preview PNG of a shard set to ``destination`` (a path or an fsspec URL)."""
    if thumbs_per_bucket < 1:
        raise ShardkitError("--thumbs-per-bucket must be at least 1")
    summary = summarize(shard_set)
    channels = int(shard_set.manifest.encoders["vae"]["latent_channels"])
    decoder = None
    if decode_with:
        source = VAE_DECODE
        decoder = _VaeDecoder(decode_with, decode_subfolder, channels)
        note = f"thumbnails: the latents' posterior mean decoded by the VAE {decode_with}" + (
            f" (subfolder {decode_subfolder})" if decode_subfolder else "")
    elif shard_set.config.get("keep_images", True):
        source = STORED_IMAGES
        note = "thumbnails: the stored images, resized and cropped as they were encoded"
    else:
        source = LATENT_CHANNELS
        note = ("thumbnails: latent channels 1-3 of the posterior mean shown as RGB, not pictures: this build left "
                "its images out; pass --decode-with VAE to decode them")
    buckets = summary.buckets
    layout = preview_layout(len(buckets), thumbs_per_bucket)
    thumbnails = [_thumbnails(shard_set, b.bucket, [b.height, b.width], thumbs_per_bucket, source, decoder) for b in buckets]

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_header(draw, layout, shard_set, note, source)
    _draw_bars(draw, layout, buckets)
    histograms = shard_set.raw.get("token_lengths") or shard_set.manifest.token_lengths()
    max_length = int(shard_set.config.get("max_length") or 0)
    _draw_histogram(draw, layout, histograms, max_length)
    _draw_sheet(canvas, draw, layout, buckets, thumbnails, thumbs_per_bucket, source)
    if not buckets:
        draw.text((layout.sheet[0], layout.sheet[1] + SECTION_H + 10), "this build holds no samples",
                  fill=MUTED, font=_font(14))
    try:
        with fsspec.open(destination, "wb") as fh:
            canvas.save(fh, format="PNG", optimize=True)
    except OSError as exc:
        raise ShardkitError(f"cannot write the preview to {destination}: {exc}") from None
    return PreviewResult(path=destination, thumbnail_source=source, note=note, width=layout.width, height=layout.height,
                         buckets=len(buckets), thumbnails=sum(1 for row in thumbnails for t in row if t.picture is not None),
                         layout=layout)
