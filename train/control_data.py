"""Training data for controllable generation: (image, condition, caption) triples.

Three layouts, told apart by what the folder holds (or chosen with ``data_format``):

- ``"folder"``: ``images/``, ``conditions/`` and ``metadata.jsonl`` with one
  ``{"image": "a.jpg", "condition": "a.png", "text": "a caption"}`` per line; file names
  are relative to ``images/`` and ``conditions/``. With ``canny`` conditions the
  ``"condition"`` key may be left out (edges come from the image).
- ``"saved"``: a ``datasets`` Dataset (or DatasetDict with a ``train`` split) written by
  ``save_to_disk``, read with ``load_from_disk``.
- ``"imagefolder"``: a ``datasets`` imagefolder: ``metadata.jsonl`` lines
  ``{"file_name": "images/a.jpg", "conditioning_image_file_name": "conditions/a.png",
  "text": ...}``.

The two ``datasets`` layouts use diffusers' column names ``image``,
``conditioning_image`` and ``text`` unless renamed.

Each example is resized (short side to the resolution), cropped and maybe flipped with
one geometry drawn from its sample seed, applied to image and condition alike: a
condition of another size than its image is resized to the image's resized size
(nearest-neighbour for segmentation maps) and gets the image's crop. Canny edges are
computed after that, at training resolution.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from hra_diffusion.conditions import (
    canny_edges,
    check_condition_type,
    make_condition,
)
from hra_diffusion.errors import fail
from hra_diffusion.train.data import (
    BucketSet,
    Size,
    apply_geometry,
    crop_geometry,
    image_size,
    open_image,
)

DATA_FORMATS: tuple[str, ...] = ("auto", "folder", "saved", "imagefolder")
"""Values of ``--data_format``; ``auto`` detects the layout."""


def detect_format(root: Path) -> str:
    """``"saved"`` for a ``save_to_disk`` folder; otherwise by ``metadata.jsonl``'s first line."""
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "saved"
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        fail(
            f"--train_data_dir {root} holds neither metadata.jsonl nor a dataset saved with "
            "save_to_disk. See --help for the three accepted layouts."
        )
    with metadata.open() as f:
        first = f.readline()
    try:
        keys = json.loads(first) if first.strip() else {}
    except json.JSONDecodeError as error:
        fail(f"{metadata} line 1 is not JSON ({error}); write one JSON object per line.")
    return "imagefolder" if "file_name" in keys else "folder"


class FolderSource:
    """The ``images/ conditions/ metadata.jsonl`` layout, checked when built.

    Every line must name an existing image (and condition, unless Canny) of equal size;
    sizes are read from the file headers, so the check is cheap.
    """

    def __init__(self, root: Path, needs_condition: bool) -> None:
        metadata = root / "metadata.jsonl"
        self.rows: list[tuple[Path, Path | None, str]] = []
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                fail(f"{where} is not JSON ({error}); write one JSON object per line.")
            required = ("image", "condition", "text") if needs_condition else ("image", "text")
            missing = [key for key in required if key not in row]
            if missing:
                fail(f"{where} lacks {missing}; each line needs {list(required)}.")
            image = root / "images" / row["image"]
            if not image.is_file():
                fail(f"{where}: image {image} does not exist; add it or remove the line.")
            condition = None
            if needs_condition:
                condition = root / "conditions" / row["condition"]
                if not condition.is_file():
                    fail(
                        f"{where}: condition file {condition} for image {row['image']} is "
                        "missing; add it or remove the line."
                    )
            self.rows.append((image, condition, str(row["text"])))

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> list[str]:
        """Every caption."""
        return [text for _, _, text in self.rows]

    def sizes(self) -> list[Size]:
        """(width, height) of every image, from the file headers."""
        return [image_size(image) for image, _, _ in self.rows]

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None, str, str]:
        """(image, condition or None, caption, example name)."""
        image, condition, text = self.rows[index]
        return (
            open_image(image),
            None if condition is None else open_image(condition),
            text,
            str(image),
        )


class DatasetSource:
    """A ``datasets.Dataset`` with image, condition and caption columns."""

    def __init__(
        self,
        dataset: object,
        image_column: str,
        conditioning_image_column: str | None,
        caption_column: str,
        where: str,
    ) -> None:
        columns = dataset.column_names
        flags = {
            image_column: "--image_column",
            conditioning_image_column: "--conditioning_image_column",
            caption_column: "--caption_column",
        }
        for column, flag in flags.items():
            if column is not None and column not in columns:
                fail(
                    f"{where} has no column {column!r} (columns: {columns}); name the right one "
                    f"with {flag}."
                )
        self.dataset = dataset
        self.columns = (image_column, conditioning_image_column, caption_column)
        self.where = where

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self) -> list[str]:
        """Every caption (of a column of caption lists, every one of each list)."""
        column = self.dataset.select_columns([self.columns[2]])[self.columns[2]]
        return [text for value in column for text in ([value] if isinstance(value, str) else value)]

    def sizes(self) -> list[Size]:
        """(width, height) of every image, from the encoded files (nothing is decoded)."""
        import datasets

        column = self.columns[0]
        encoded = self.dataset.cast_column(column, datasets.Image(decode=False))
        sizes = []
        for row in encoded.select_columns([column]):  # one row in memory at a time
            value = row[column]
            encoded_file = io.BytesIO(value["bytes"]) if value["bytes"] else value["path"]
            sizes.append(image_size(encoded_file))
        return sizes

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None, str, str]:
        """(image, condition or None, caption, example name)."""
        image_column, condition_column, caption_column = self.columns
        row = self.dataset[index]
        image = ImageOps.exif_transpose(row[image_column])
        condition = None if condition_column is None else row[condition_column]
        name = f"{self.where} row {index}"
        return image, condition, row[caption_column], name


def _load_saved(root: Path) -> object:
    """The ``train`` split of a ``save_to_disk`` folder (a Dataset, or a DatasetDict's)."""
    import datasets

    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            fail(f"--train_data_dir {root} holds splits {splits} but no 'train' split.")
        root = root / "train"
    state = json.loads((root / "state.json").read_text())
    if not state.get("_data_files"):  # datasets cannot load_from_disk an empty dataset
        fail(f"--train_data_dir {root} holds no examples; add (image, condition, text) triples.")
    return datasets.load_from_disk(str(root))


def load_control_source(
    train_data_dir: str,
    data_format: str,
    condition_type: str,
    image_column: str,
    conditioning_image_column: str,
    caption_column: str,
) -> FolderSource | DatasetSource:
    """Open ``train_data_dir`` in the given (or detected) layout; :func:`fail` on bad input."""
    root = Path(train_data_dir)
    if not root.is_dir():
        fail(f"--train_data_dir {root} does not exist or is not a folder.")
    check_condition_type(condition_type)
    needs_condition = condition_type != "canny"
    layout = detect_format(root) if data_format == "auto" else data_format
    if layout == "folder":
        source = FolderSource(root, needs_condition)
    else:
        import datasets

        if layout == "saved":
            dataset = _load_saved(root)
        else:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
        condition_column = conditioning_image_column if needs_condition else None
        source = DatasetSource(dataset, image_column, condition_column, caption_column, str(root))
    if len(source) == 0:
        fail(f"--train_data_dir {root} holds no examples; add (image, condition, text) triples.")
    return source


def _condition_resample(condition_type: str) -> Image.Resampling:
    """Nearest-neighbour for segmentation maps (no new colours), bilinear otherwise."""
    if condition_type == "segmentation":
        return Image.Resampling.NEAREST
    return Image.Resampling.BILINEAR


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous()  # (3, H, W) in [0, 1]


class ControlDataset(torch.utils.data.Dataset):
    """Examples ``{"pixel_values": (3, R, R) in [-1, 1], "conditioning_pixel_values":
    (3, R, R) in [0, 1], "text": str}``, indexed by ``(index, sample_seed)`` pairs from
    :class:`~hra_diffusion.train.checkpoints.SeededEpochSampler`.

    The sample seed draws the crop, the flip and whether the caption is replaced by ""
    (probability ``proportion_empty_prompts``), so resumed runs see the same examples.
    With ``buckets`` every example trains at the bucket nearest to its image's aspect
    ratio (:attr:`item_buckets`, for a :class:`~hra_diffusion.train.data.BucketSampler`),
    otherwise at the ``resolution`` square; R below stands for either side.
    """

    def __init__(
        self,
        source: FolderSource | DatasetSource,
        condition_type: str,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        proportion_empty_prompts: float = 0.0,
        canny_low_threshold: int = 100,
        canny_high_threshold: int = 200,
        buckets: BucketSet | None = None,
    ) -> None:
        self.source = source
        self.condition_type = check_condition_type(condition_type)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.thresholds = (canny_low_threshold, canny_high_threshold)
        if buckets is None:
            self.item_buckets = [(resolution, resolution)] * len(source)
        else:
            self.item_buckets = [buckets.nearest(size) for size in source.sizes()]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | str]:
        index, seed = key
        rng = random.Random(seed)
        image, condition, text, name = self.source.load(index)
        image = image.convert("RGB")
        size = self.item_buckets[index]
        geometry = crop_geometry(image, size, rng, self.center_crop, self.random_flip)
        image = apply_geometry(image, geometry, Image.Resampling.BILINEAR)  # (R, R)
        if self.condition_type == "canny":
            control = canny_edges(image, *self.thresholds)
        else:
            try:
                control = make_condition(self.condition_type, condition=condition)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            control = apply_geometry(control, geometry, _condition_resample(self.condition_type))
        if isinstance(text, list | tuple):
            text = rng.choice(text)
        if rng.random() < self.proportion_empty_prompts:
            text = ""
        pixels = _to_tensor(image) * 2.0 - 1.0  # (3, R, R) in [-1, 1]
        return {
            "pixel_values": pixels,
            "conditioning_pixel_values": _to_tensor(control),
            "text": text,
        }


def collate_control(examples: list[dict]) -> dict[str, torch.Tensor | list[str]]:
    """Stack pixels (B, 3, R, R) and conditions (B, 3, R, R); keep captions as a list."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "conditioning_pixel_values": torch.stack(
            [e["conditioning_pixel_values"] for e in examples]
        ),
        "text": [e["text"] for e in examples],
    }


def validation_condition(
    path: str | os.PathLike, condition_type: str, resolution: int, low: int, high: int
) -> Image.Image:
    """The RGB control image of a ``--validation_image``, resized/cropped like training data.

    For ``canny`` the file is a photo whose edges are taken; otherwise it is a condition.
    """
    image = open_image(Path(path))
    geometry = crop_geometry(
        image, resolution, random.Random(0), center_crop=True, random_flip=False
    )
    if condition_type == "canny":
        return canny_edges(
            apply_geometry(image.convert("RGB"), geometry, Image.Resampling.BILINEAR), low, high
        )
    control = make_condition(condition_type, condition=image)
    return apply_geometry(control, geometry, _condition_resample(condition_type))
