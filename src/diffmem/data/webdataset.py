"""WebDataset shards: ``.tar`` files whose members ``KEY.jpg`` (or png, webp, ...) and ``KEY.txt`` make one
sample, as img2dataset writes them; read with the standard library's ``tarfile``.

A sample's key is its member name up to the first dot of the file name, with the shard's name in front
so that keys stay distinct across shards. Images are read from the shard when a row is opened.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from diffmem.data.rows import Listed, RowReport, TrainingData, checked, open_rgb
from diffmem.errors import DiffmemError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSION = "txt"
# why a sample is not used, beside the checks every row passes
IMAGE_WITHOUT_CAPTION = "image without caption"
CAPTION_WITHOUT_IMAGE = "caption without image"
UNREADABLE_SHARD = "unreadable shard"


def shard_files(path: Path) -> list[Path]:
    """The shard ``path``, or the ``.tar`` files directly in the folder ``path``, by name."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix == ".tar" else []
    return sorted(p for p in path.glob("*.tar") if p.is_file())


def read_shards(
    path: Path, caption_extension: str | None = None, require_captions: bool = True
) -> TrainingData:
    """The samples of the shard or folder of shards at ``path``, checked, with the report of those that
    fail. Captions are the ``KEY.txt`` members, or ``KEY.{caption_extension}``."""
    shards = shard_files(path)
    if not shards:
        raise DiffmemError(f"no .tar shards in {path}: point at a WebDataset shard or a folder of them")
    extension = caption_extension or CAPTION_EXTENSION
    report = RowReport(f"WebDataset shards {Path(path).resolve()}", extension)
    listed: list[Listed] = []
    for shard in shards:
        try:
            listed += _samples(shard, extension, require_captions)
        except (OSError, tarfile.TarError):
            listed.append(Listed(shard.name, None, None, UNREADABLE_SHARD))
    return checked(listed, report, require_captions)


def _samples(shard: Path, caption_extension: str, require_captions: bool) -> list[Listed]:
    """One entry per key of ``shard`` that has an image or a caption, in the order the shard holds them."""
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, bytes] = {}
    keys: dict[str, None] = {}
    with tarfile.open(shard, mode="r:") as tar:  # uncompressed: images are read in place
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.removeprefix("./").rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = f"{shard.name}/{folder}/{stem}" if folder else f"{shard.name}/{stem}"
            extension = extension.lower()
            if extension in IMAGE_EXTENSIONS:
                images[key] = member
                keys[key] = None
            elif extension == caption_extension:
                captions[key] = tar.extractfile(member).read()
                keys[key] = None
    return [_sample(shard, key, images.get(key), captions.get(key), require_captions) for key in keys]


def _sample(
    shard: Path, key: str, image: tarfile.TarInfo | None, caption: bytes | None, require_captions: bool
) -> Listed:
    if image is None:
        return Listed(key, caption, None, CAPTION_WITHOUT_IMAGE)
    load = open_rgb(lambda: io.BytesIO(_member_bytes(shard, image)))
    if caption is None and require_captions:
        return Listed(key, None, load, IMAGE_WITHOUT_CAPTION)
    return Listed(key, caption, load)


def _member_bytes(shard: Path, member: tarfile.TarInfo) -> bytes:
    """A regular member's content, read straight from its place in the (uncompressed) shard."""
    with shard.open("rb") as file:
        file.seek(member.offset_data)
        return file.read(member.size)
