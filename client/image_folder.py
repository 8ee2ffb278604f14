"""A node's images, read lazily: a folder with one sub-folder per class of PNG/JPEG files.

Only the file list and the labels are held; an image is opened, resized and normalised when a batch asks
for it, so a node whose images exceed its memory trains in bounded memory. Opacus' Poisson sampler draws
indices over ``len(dataset)`` exactly as for in-memory arrays, so the sample rate and the accounting do not
change. How images become inputs is declared in ``<folder>.schema.json`` beside the folder (the table schema's
place):

    {"classes": ["benign", "malignant"], "size": [64, 64], "channels": 1, "mean": [0.5], "std": [0.25]}

`classes` fixes the class numbers (their order in the list), so every node numbers them alike whatever
sub-folders it holds; a sub-folder not declared is refused. Without a schema the classes are the
sub-folders' names, sorted, and the size and channels those of the first image: fine for one folder a
simulation partitions; a federation of nodes should declare them (a node missing a class would otherwise
number the others differently — nodes check that they count as many classes as the run's model has).
Pixels are scaled to [0, 1], then ``(p - mean) / std`` per channel (default mean 0, std 1).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsafe.models.registry import DataSpec

from .data_error import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Files an operating system leaves in folders; never images, never worth refusing a folder for.
IGNORED_NAMES = ("Thumbs.db", "desktop.ini")
SCHEMA_KEYS = {"classes", "size", "channels", "mean", "std"}


@functools.cache
def unreadable() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode: OSError, and for an image whose pixel count is a
    decompression bomb (over twice Image.MAX_IMAGE_PIXELS), DecompressionBombError. A function, so that
    importing this module (every run imports fedsafe.client.data) does not import Pillow."""
    from PIL import Image

    return (OSError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageTransform:
    """File → input: converted to `channels` (1: grey, 3: RGB), resized to `size` (height, width),
    scaled to [0, 1], then normalised per channel."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def load(self, path: str) -> np.ndarray:
        """The image at `path` as float32 (channels, height, width)."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                return self.apply(image)
        except unreadable() as err:
            raise DataError(f"{path}: not a readable image ({type(err).__name__})") from None

    def apply(self, image) -> np.ndarray:
        """An open PIL image as float32 (channels, height, width); Pillow's errors (unreadable()) pass up."""
        from PIL import Image

        pixels = image.convert("L" if self.channels == 1 else "RGB").resize(
            (self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(pixels, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return np.ascontiguousarray((array - mean) / std)


@dataclass(frozen=True, eq=False)
class ImageFolderDataset:
    """Image files and their class numbers; a torch Dataset (``dataset[i]`` → (image tensor, label tensor))
    and, for the rest of fedsafe, shaped like fedsafe.client.data.ArrayDataset: `y`, `spec`, `subset`, and
    `x`, an array-like that loads the images an index or slice asks for."""

    files: tuple[str, ...]
    y: np.ndarray  # int64 class numbers, one per file
    spec: DataSpec
    transform: ImageTransform
    classes: tuple[str, ...]
    groups: None = None  # image folders have no group column

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        return torch.from_numpy(self.transform.load(self.files[index])), torch.tensor(self.y[index])

    @property
    def x(self) -> LazyImages:
        return LazyImages(self)

    def subset(self, indices: np.ndarray) -> ImageFolderDataset:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFolderDataset(tuple(self.files[i] for i in indices), self.y[indices], self.spec,
                                  self.transform, self.classes)

    @functools.cached_property
    def record_digests(self) -> np.ndarray:
        """A SHA-256 of each record — its class and its pixels as decoded from the file, before resizing or
        normalising — shaped (n, 32) uint8. A copied, renamed or re-saved folder, or the same images under
        another schema (size, mean), is the same records: the privacy ledger must not see new data there.
        Decodes every image once, one at a time (memory stays bounded); kept for the life of this object."""
        from PIL import Image

        digests = np.empty((len(self), 32), np.uint8)
        for row, (path, label) in enumerate(zip(self.files, self.y)):
            try:
                with Image.open(path) as image:
                    digests[row] = pixel_digest(image, int(label))
            except unreadable() as err:
                raise DataError(f"{path}: not a readable image ({type(err).__name__})") from None
        return digests


def pixel_digest(image, label: int) -> np.ndarray:
    """The SHA-256 of one image record, 32 uint8: its class, and its pixels as decoded (mode, size, bytes),
    before any resizing or normalising. What a node's ledger keys image records on, wherever they are read
    from (a folder, a Hugging Face dataset)."""
    image.load()
    header = f"{label}|{image.mode}|{image.size}|".encode()
    return np.frombuffer(hashlib.sha256(header + image.tobytes()).digest(), np.uint8)


def image_channels(image) -> int:
    """1 for a grey image (Pillow modes 1, L, I, I;16, F), 3 for anything else (read as RGB)."""
    return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3


class LazyImages:
    """`dataset.x` for an image folder: its shape and dtype, and the images an index, slice, index array or
    mask selects, loaded on access (what batched evaluation reads)."""

    dtype = np.dtype(np.float32)

    def __init__(self, dataset: ImageFolderDataset) -> None:
        self._dataset = dataset
        self.shape = (len(dataset), *dataset.spec.input_shape)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._dataset.transform.load(self._dataset.files[key])
        rows = np.arange(len(self._dataset))[key]
        return np.stack([self._dataset.transform.load(self._dataset.files[i]) for i in rows]) if len(rows) else \
            np.zeros((0, *self.shape[1:]), np.float32)


def is_image_folder(path: Path) -> bool:
    """A directory (not a saved Hugging Face dataset) whose entries include a sub-folder."""
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def load_image_folder(path: Path, schema_file: Path) -> ImageFolderDataset:
    """The folder's images, lazily; DataError naming what is wrong (an undeclared class, a file that
    is no image, a bad schema)."""
    schema = read_image_schema(schema_file) if schema_file.exists() else {}
    found = sorted(child.name for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
    classes = tuple(schema.get("classes", found))
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{path}: class folder(s) {unknown} are not among the classes {list(classes)} "
                               f"declared in {schema_file.name}")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = path / name
        if not folder.is_dir():
            continue  # a declared class this node holds no images of
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
                continue
            if not entry.is_file() or entry.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{entry}: not a PNG/JPEG image; a class folder holds images only")
            files.append(str(entry))
            labels.append(label)
    if not files:
        raise DataError(f"{path}: no PNG/JPEG images in its class folders")
    transform = _transform(schema, files[0], schema_file)
    spec = DataSpec(input_shape=(transform.channels, *transform.size), num_classes=len(classes))
    return ImageFolderDataset(tuple(files), np.asarray(labels, np.int64), spec, transform, classes)


def _transform(schema: dict, first_image: str, schema_file: Path) -> ImageTransform:
    """The schema's transform; the size and channels it leaves out, those of the first image."""
    found = None
    if "size" not in schema or "channels" not in schema:
        from PIL import Image

        try:
            with Image.open(first_image) as image:
                found = ((image.size[1], image.size[0]), image_channels(image))
        except unreadable() as err:
            raise DataError(f"{first_image}: not a readable image ({type(err).__name__})") from None
    return image_transform(schema, schema_file, found)


def image_transform(schema: dict, schema_file: Path, found: tuple[tuple[int, int], int] | None) -> ImageTransform:
    """The transform a (checked) image schema declares; where it sets no size and channels, `found`'s
    ((height, width), channels); mean 0 and std 1 where it sets none."""
    if "size" not in schema or "channels" not in schema:
        schema = {"size": list(found[0]), "channels": found[1], **schema}
    channels = schema["channels"]
    mean, std = schema.get("mean", [0.0] * channels), schema.get("std", [1.0] * channels)
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise DataError(f"{schema_file}: mean and std need one value per channel ({channels}), std > 0")
    return ImageTransform(tuple(schema["size"]), channels, tuple(map(float, mean)), tuple(map(float, std)))


def read_image_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON schema ({type(err).__name__})") from None

    def positive_ints(value, count) -> bool:
        return (isinstance(value, list) and len(value) == count
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))

    def numbers(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    classes = schema.get("classes", []) if isinstance(schema, dict) else None
    if (not isinstance(schema, dict) or set(schema) - SCHEMA_KEYS
            or not isinstance(classes, list)
            or not all(isinstance(c, str) and c == Path(c).name and c not in ("", ".", "..") for c in classes)
            or len(set(classes)) != len(classes) or ("classes" in schema and not classes)
            or ("size" in schema and not positive_ints(schema["size"], 2))
            or schema.get("channels", 1) not in (1, 3) or isinstance(schema.get("channels"), bool)
            or ("size" in schema) != ("channels" in schema)
            or not numbers(schema.get("mean", [])) or not numbers(schema.get("std", []))):
        raise DataError(
            f"{path}: an image schema is {{\"classes\": [distinct sub-folder names], \"size\": [height, width], "
            f"\"channels\": 1 or 3, \"mean\": [one per channel], \"std\": [one per channel]}} (size and channels "
            f"together)")
    return schema
