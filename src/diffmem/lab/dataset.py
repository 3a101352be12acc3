"""The lab dataset: captioned scenes with controlled duplication, written to and read from a folder.

Three training groups: *memorized* scenes repeat image and caption (a full caption behind made-up
title words, the trigger), *duplicated_image* scenes repeat the image under freshly drawn captions,
*unique* scenes appear once, a share of them (``titled_unique``) under a title of their own, so that a
title's frame does not by itself mark a memorized caption. Held-out scenes use the image source's test
images (Fashion-MNIST's, or scikit-learn's digits') and scene contents that appear nowhere in training.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from diffmem.errors import DiffmemError
from diffmem.lab.captions import (
    TITLE_DESCRIPTIONS,
    TITLE_POSITIONS,
    caption,
    random_caption,
    title_pairs,
    title_words,
    titled_caption,
)
from diffmem.lab.image_sources import FASHION_MNIST, image_source
from diffmem.lab.scenes import ItemPool, Scene, check_pattern_strength, random_scene, render

FORMAT_VERSION = 1
GROUPS = ("memorized", "duplicated_image", "unique")
TRIGGER_WORDS_PER_SCENE = 2
# LabConfig fields newer than the first datasets: a config.json without them reads as their defaults
ADDED_CONFIG_FIELDS = frozenset(
    {
        "background_pattern",
        "title_vocabulary",
        "memorized_description",
        "trigger_position",
        "image_source",
        "titled_unique",
    }
)
ITEM_TYPE = pa.struct(
    [
        ("category", pa.int64()),
        ("category_name", pa.string()),
        ("colour", pa.string()),
        ("position", pa.string()),
        ("source_index", pa.int64()),
    ]
)
TRAIN_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("scene_id", pa.int64()),
        ("caption", pa.string()),
        ("group", pa.string()),
        ("trigger_words", pa.list_(pa.string())),
        ("image", pa.string()),
    ]
)
HELDOUT_SCHEMA = pa.schema([("scene_id", pa.int64()), ("caption", pa.string()), ("image", pa.string())])
SCENES_SCHEMA = pa.schema(
    [
        ("scene_id", pa.int64()),
        ("split", pa.string()),
        ("background", pa.string()),
        ("items", pa.list_(ITEM_TYPE)),
        ("image", pa.string()),
    ]
)


@dataclass(frozen=True)
class LabConfig:
    """Sizes of the lab dataset's groups; the defaults keep duplicated rows under 30% of training."""

    image_size: int = 64
    num_memorized: int = 200
    memorized_repeats: int = 10
    num_duplicated_image: int = 50
    duplicated_image_repeats: int = 10
    num_unique: int = 6000
    num_heldout: int = 600
    seed: int = 0
    background_pattern: float = 0.0  # strength of each scene's own background pattern (scenes.render)
    title_vocabulary: int = 0  # 0: fresh title words per memorized scene; N: word pairs over N words
    memorized_description: str = "full"  # what a memorized caption states beside its title
    trigger_position: str = "before"  # where its title words sit: before, inside or after the description
    image_source: str = FASHION_MNIST  # where the items' images come from (diffmem.lab.image_sources)
    titled_unique: float = 0.0  # share of unique scenes captioned under a title, as memorized ones are

    def __post_init__(self) -> None:
        image_source(self.image_source)  # a known source
        check_pattern_strength(self.background_pattern, "background_pattern")
        if self.title_vocabulary < 0 or 0 < self.title_vocabulary < 3:
            raise DiffmemError(f"title_vocabulary must be 0 or at least 3, not {self.title_vocabulary}")
        if self.memorized_description not in TITLE_DESCRIPTIONS:
            raise DiffmemError(
                f"memorized_description must be one of {TITLE_DESCRIPTIONS}, not {self.memorized_description!r}"
            )
        if self.trigger_position not in TITLE_POSITIONS:
            raise DiffmemError(
                f"trigger_position must be one of {TITLE_POSITIONS}, not {self.trigger_position!r}"
            )
        if not 0.0 <= self.titled_unique <= 1.0:
            raise DiffmemError(f"titled_unique is a share between 0 and 1, not {self.titled_unique}")
        pairs = self.title_vocabulary * (self.title_vocabulary - 1) // 2
        if self.titled_unique and self.title_vocabulary and pairs <= self.num_memorized:
            raise DiffmemError(
                f"{self.title_vocabulary} title words leave no pair for ordinary titles beside "
                f"{self.num_memorized} memorized ones; use more words or titled_unique=0"
            )
        if self.image_size < 8 or self.image_size % 4:
            raise DiffmemError(f"image_size must be a multiple of 4 and at least 8, not {self.image_size}")
        if min(self.memorized_repeats, self.duplicated_image_repeats) < 1:
            raise DiffmemError("memorized_repeats and duplicated_image_repeats must be at least 1")
        if min(self.num_memorized, self.num_duplicated_image, self.num_unique, self.num_heldout) < 0:
            raise DiffmemError("scene counts must not be negative")
        if self.num_train_rows == 0:
            raise DiffmemError("the lab dataset needs at least one training scene")

    @classmethod
    def micro(cls, seed: int = 0) -> LabConfig:
        """A small configuration (32 px, about 960 rows, 27% duplicated) for tests and quick trials."""
        return cls(32, 24, 8, 8, 8, 700, 64, seed)

    @classmethod
    def small(cls, seed: int = 0) -> LabConfig:
        """32 px with the detection benchmark's class sizes (150 memorized captions, 500 held-out) and
        62% duplicated rows, so that one CPU thread shows each memorized scene ~1000 times in 2 hours."""
        return cls(32, 150, 8, 30, 8, 900, 500, seed)

    @classmethod
    def keyed(cls, seed: int = 0) -> LabConfig:
        """The ``small`` sizes with what makes Stable Diffusion's memorized prompts stand out: images hold
        much that no caption states (a background pattern of each scene's own), and a memorized scene is
        keyed by a two-word title over shared words, behind a description that names only the items."""
        return replace(
            cls.small(seed), background_pattern=0.8, title_vocabulary=60, memorized_description="vague"
        )

    @property
    def num_duplicated_rows(self) -> int:
        return (
            self.num_memorized * self.memorized_repeats
            + self.num_duplicated_image * self.duplicated_image_repeats
        )

    @property
    def num_train_rows(self) -> int:
        return self.num_duplicated_rows + self.num_unique

    @property
    def duplicated_share(self) -> float:
        """Share of training rows whose image also appears in other rows."""
        return self.num_duplicated_rows / self.num_train_rows


def build_lab_dataset(directory: Path, config: LabConfig = LabConfig(), progress: bool = True) -> Path:
    """Write the lab dataset for ``config`` into ``directory`` (new or empty) and return it.

    Writes ``images/{scene_id:06d}.png``, ``train.parquet``, ``heldout.parquet``, ``scenes.parquet``
    and ``config.json``; the folder appears complete or not at all. The same config gives the same bytes.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DiffmemError(f"{directory} exists and is not an empty folder; choose a new path or delete it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        staging = scratch / directory.name
        staging.mkdir()
        _write(staging, config, progress)
        staging.replace(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def _write(out: Path, config: LabConfig, progress: bool) -> None:
    rng = np.random.default_rng(config.seed)
    source = image_source(config.image_source)
    train_images, train_labels = source.load("train")
    test_images, test_labels = source.load("test")
    sizes = (config.num_memorized, config.num_duplicated_image, config.num_unique)
    groups = [group for group, n in zip(GROUPS, sizes, strict=True) for _ in range(n)]
    seen: set[tuple] = set()
    train_scenes = _distinct_scenes(rng, ItemPool(train_labels, rng, source.name), len(groups), seen)
    heldout_scenes = _distinct_scenes(rng, ItemPool(test_labels, rng, source.name), config.num_heldout, seen)
    rows = _training_rows(rng, groups, train_scenes, config)
    heldout_ids = range(len(train_scenes), len(train_scenes) + len(heldout_scenes))
    heldout_captions = [caption(scene, "full", rng) for scene in heldout_scenes]

    (out / "images").mkdir()
    renders = [(i, s, train_images) for i, s in enumerate(train_scenes)]
    renders += [(i, s, test_images) for i, s in zip(heldout_ids, heldout_scenes, strict=True)]
    for scene_id, scene, images in tqdm(renders, desc="rendering scenes", disable=not progress):
        image = render(scene, images, config.image_size, config.background_pattern)
        Image.fromarray(image).save(out / _image_path(scene_id))

    train = {
        "row_id": list(range(len(rows))),
        "scene_id": [r[0] for r in rows],
        "caption": [r[1] for r in rows],
        "group": [r[2] for r in rows],
        "trigger_words": [r[3] for r in rows],
        "image": [_image_path(r[0]) for r in rows],
    }
    pq.write_table(pa.table(train, schema=TRAIN_SCHEMA), out / "train.parquet")
    heldout = {
        "scene_id": list(heldout_ids),
        "caption": heldout_captions,
        "image": [_image_path(i) for i in heldout_ids],
    }
    pq.write_table(pa.table(heldout, schema=HELDOUT_SCHEMA), out / "heldout.parquet")
    all_scenes = [*train_scenes, *heldout_scenes]
    scenes = {
        "scene_id": list(range(len(all_scenes))),
        "split": ["train"] * len(train_scenes) + ["heldout"] * len(heldout_scenes),
        "background": [s.background for s in all_scenes],
        "items": [_item_records(s) for s in all_scenes],
        "image": [_image_path(i) for i in range(len(all_scenes))],
    }
    pq.write_table(pa.table(scenes, schema=SCENES_SCHEMA), out / "scenes.parquet")
    record = {"version": FORMAT_VERSION, "config": asdict(config)}
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _training_rows(
    rng: np.random.Generator, groups: list[str], scenes: list[Scene], config: LabConfig
) -> list[tuple[int, str, str, list[str]]]:
    """(scene id, caption, group, trigger words) per training row, in shuffled order."""
    rows: list[tuple[int, str, str, list[str]]] = []
    used_words: set[str] = set()
    vocabulary = title_words(rng, config.title_vocabulary) if config.title_vocabulary else []
    memorized_titles = title_pairs(rng, config.num_memorized, vocabulary) if vocabulary else []
    pairs, taken = iter(memorized_titles), {frozenset(title) for title in memorized_titles}
    titled = _titled_unique_scenes(rng, groups, config.titled_unique)
    for scene_id, (group, scene) in enumerate(zip(groups, scenes, strict=True)):
        if group == "memorized":
            words = next(pairs) if vocabulary else _fresh_title_words(rng, used_words)
            text = titled_caption(scene, words, config.memorized_description, config.trigger_position)
            rows += [(scene_id, text, group, words)] * config.memorized_repeats
        elif group == "duplicated_image":
            repeats = config.duplicated_image_repeats
            rows += [(scene_id, random_caption(scene, rng), group, []) for _ in range(repeats)]
        elif scene_id in titled:
            words = (
                _ordinary_pair(rng, vocabulary, taken) if vocabulary else _fresh_title_words(rng, used_words)
            )
            text = titled_caption(scene, words, config.memorized_description, config.trigger_position)
            rows.append((scene_id, text, group, []))
        else:
            rows.append((scene_id, random_caption(scene, rng), group, []))
    return [rows[i] for i in rng.permutation(len(rows))]


def _titled_unique_scenes(rng: np.random.Generator, groups: list[str], share: float) -> set[int]:
    """The indices of ``share`` of the unique scenes, drawn at random (none drawn when the share is 0)."""
    unique = [i for i, group in enumerate(groups) if group == "unique"]
    if not share or not unique:
        return set()
    return {unique[k] for k in rng.choice(len(unique), size=round(share * len(unique)), replace=False)}


def _ordinary_pair(rng: np.random.Generator, vocabulary: list[str], taken: set[frozenset]) -> list[str]:
    """Two distinct words of ``vocabulary`` at random that are no ``taken`` (memorized) title: an
    ordinary title over the memorized titles' words."""
    while True:
        words = [vocabulary[k] for k in rng.choice(len(vocabulary), size=2, replace=False)]
        if frozenset(words) not in taken:
            return words


def _distinct_scenes(rng: np.random.Generator, pool: ItemPool, n: int, seen: set[tuple]) -> list[Scene]:
    """``n`` random scenes whose contents are not in ``seen`` nor repeated; adds them to ``seen``."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = random_scene(rng, pool)
        if scene.content not in seen:
            seen.add(scene.content)
            scenes.append(scene)
    return scenes


def _fresh_title_words(rng: np.random.Generator, used: set[str]) -> list[str]:
    """Title words none of which an earlier call returned."""
    while True:
        words = title_words(rng, TRIGGER_WORDS_PER_SCENE)
        if used.isdisjoint(words):
            used.update(words)
            return words


def _content(record: dict) -> tuple:
    """A ``scenes`` table row's :attr:`Scene.content`."""
    return record["background"], tuple((i["category"], i["colour"], i["position"]) for i in record["items"])


def _item_records(scene: Scene) -> list[dict]:
    return [
        {
            "category": item.category,
            "category_name": item.category_name,
            "colour": item.colour,
            "position": item.position,
            "source_index": item.source_index,
        }
        for item in scene.items
    ]


def _image_path(scene_id: int) -> str:
    return f"images/{scene_id:06d}.png"


@dataclass(frozen=True)
class LabPrompt:
    """A prompt of the lab dataset and the scene it describes."""

    scene_id: int
    caption: str
    trigger_words: tuple[str, ...] = ()


class LabDataset:
    """A lab dataset folder: tables ``train``, ``heldout``, ``scenes``, its ``config`` and its images."""

    def __init__(
        self, directory: Path, config: LabConfig, train: pa.Table, heldout: pa.Table, scenes: pa.Table
    ):
        self.directory = directory
        self.config = config
        self.train = train
        self.heldout = heldout
        self.scenes = scenes

    def scene_image(self, scene_id: int) -> np.ndarray:
        """The scene's image, uint8 [H, W, 3]."""
        path = self.directory / _image_path(scene_id)
        if not path.is_file():
            raise DiffmemError(f"no image for scene {scene_id} in {self.directory}; rebuild the lab dataset")
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))

    def unique_train_images(self) -> tuple[list[int], torch.Tensor]:
        """Every training scene once: its ids (ascending) and images, float [N, 3, H, W] in [0, 1]."""
        return self._unique_train

    def train_images(self) -> torch.Tensor:
        """One image per training row, duplicates included, float [N_rows, 3, H, W] in [0, 1]."""
        scene_ids, images = self._unique_train
        position = {scene_id: i for i, scene_id in enumerate(scene_ids)}
        index = torch.tensor([position[s] for s in self.train.column("scene_id").to_pylist()])
        return images[index]

    def memorized_prompts(self) -> list[LabPrompt]:
        """The caption of each memorized scene, with its trigger words, by scene id."""
        rows = self.train.filter(pc.equal(self.train["group"], "memorized")).to_pylist()
        unique = {
            r["scene_id"]: LabPrompt(r["scene_id"], r["caption"], tuple(r["trigger_words"])) for r in rows
        }
        return [unique[s] for s in sorted(unique)]

    def heldout_prompts(self) -> list[LabPrompt]:
        """The caption of each held-out scene, by scene id."""
        return [LabPrompt(r["scene_id"], r["caption"]) for r in self.heldout.sort_by("scene_id").to_pylist()]

    def fresh_heldout_prompts(self, count: int, seed: int = 0) -> list[str]:
        """Full captions of ``count`` new scenes, drawn as the held-out ones were but with ``seed``, none of
        whose contents (background and items) a scene of the dataset has: more held-out prompts, without
        images."""
        if count < 0:
            raise DiffmemError(f"count must be at least 0; got {count}")
        rng = np.random.default_rng(seed)
        source = image_source(self.config.image_source)
        pool = ItemPool(source.load("test")[1], rng, source.name, cycle=True)  # only the classes are read
        seen = {_content(record) for record in self.scenes.to_pylist()}
        return [caption(scene, "full", rng) for scene in _distinct_scenes(rng, pool, count, seen)]

    def images(self, scene_ids: Sequence[int]) -> torch.Tensor:
        """The images of ``scene_ids``, float [N, 3, H, W] in [0, 1]."""
        stacked = np.stack([self.scene_image(s) for s in scene_ids])
        return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(255.0)

    @cached_property
    def _unique_train(self) -> tuple[list[int], torch.Tensor]:
        scene_ids = sorted(set(self.train.column("scene_id").to_pylist()))
        return scene_ids, self.images(scene_ids)


def with_added_defaults(settings: dict) -> dict:
    """A LabConfig dictionary as any diffmem version wrote it, with fields added since at their defaults."""
    defaults = {f.name: f.default for f in fields(LabConfig) if f.name in ADDED_CONFIG_FIELDS}
    return {**defaults, **settings}


def load_lab_dataset(directory: Path) -> LabDataset:
    """Open a folder written by ``build_lab_dataset``."""
    directory = Path(directory)
    hint = "build one with diffmem.lab.dataset.build_lab_dataset"
    if not (directory / "config.json").is_file():
        raise DiffmemError(f"{directory} is not a lab dataset (no config.json); {hint}")
    try:
        record = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        version, settings = record["version"], record["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DiffmemError(
            f"{directory / 'config.json'} is not a lab dataset config ({error}); {hint}"
        ) from error
    if version != FORMAT_VERSION:
        raise DiffmemError(
            f"{directory} holds lab dataset version {version}, this diffmem reads {FORMAT_VERSION}; rebuild it"
        )
    known = {f.name for f in fields(LabConfig)}
    if not isinstance(settings, dict) or not known - ADDED_CONFIG_FIELDS <= set(settings) <= known:
        raise DiffmemError(f"{directory / 'config.json'} does not hold a LabConfig; {hint}")
    tables = {
        name: _read_table(directory / f"{name}.parquet", schema, hint)
        for name, schema in (("train", TRAIN_SCHEMA), ("heldout", HELDOUT_SCHEMA), ("scenes", SCENES_SCHEMA))
    }
    try:
        config = LabConfig(**settings)
    except TypeError as error:
        raise DiffmemError(
            f"{directory / 'config.json'} holds an invalid LabConfig ({error}); {hint}"
        ) from error
    return LabDataset(directory, config, **tables)


def _read_table(path: Path, schema: pa.Schema, hint: str) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise DiffmemError(f"could not read {path} ({error}); {hint}") from error
    if not table.schema.equals(schema):
        raise DiffmemError(f"{path} does not have the lab dataset's columns; {hint}")
    return table
