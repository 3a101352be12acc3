"""Scenes: one to three colourised items (Fashion-MNIST clothes or handwritten digits) at named positions on a
solid background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffmem.errors import DiffmemError
from diffmem.lab.image_sources import FASHION_MNIST, NUM_CATEGORIES, image_source

ITEM_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "pink": (250, 130, 190),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "black": (0, 0, 0),
    "beige": (200, 180, 140),
    "navy": (20, 30, 90),
    "teal": (0, 100, 110),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CENTER = "center"
POSITIONS = (*QUADRANTS, CENTER)
MAX_ITEMS = 3
NUM_ITEMS_WEIGHTS = {1: 0.2, 2: 0.4, 3: 0.4}
PATTERN_GRID = 4  # control points per side of the background pattern: smooth at the lab's latent sizes


@dataclass(frozen=True)
class Item:
    """An image of ``source`` (``source_index`` into its split) of class ``category``, coloured and placed."""

    category: int
    colour: str
    position: str
    source_index: int
    source: str = FASHION_MNIST

    @property
    def category_name(self) -> str:
        return image_source(self.source).class_names[self.category]


@dataclass(frozen=True)
class Scene:
    """A background colour and one to three items; items are kept in reading order of their positions.

    A single item may sit at any position, including the center; two or three items take distinct
    quadrants and distinct categories.
    """

    background: str
    items: tuple[Item, ...]

    def __post_init__(self) -> None:
        for item in self.items:
            if item.position not in POSITIONS:
                raise DiffmemError(f"unknown position {item.position!r}; use one of {list(POSITIONS)}")
        object.__setattr__(
            self, "items", tuple(sorted(self.items, key=lambda i: POSITIONS.index(i.position)))
        )
        if self.background not in BACKGROUND_COLOURS:
            raise DiffmemError(
                f"unknown background {self.background!r}; use one of {list(BACKGROUND_COLOURS)}"
            )
        if not 1 <= len(self.items) <= MAX_ITEMS:
            raise DiffmemError(f"a scene holds 1 to {MAX_ITEMS} items, not {len(self.items)}")
        for item in self.items:
            if item.colour not in ITEM_COLOURS:
                raise DiffmemError(f"unknown item colour {item.colour!r}; use one of {list(ITEM_COLOURS)}")
            if not 0 <= item.category < NUM_CATEGORIES:
                raise DiffmemError(f"item category {item.category} is not a class (0-{NUM_CATEGORIES - 1})")
        positions = [item.position for item in self.items]
        if len(self.items) > 1 and (CENTER in positions or len(set(positions)) < len(positions)):
            raise DiffmemError(f"items of a multi-item scene need distinct quadrants, got {positions}")
        if len({item.category for item in self.items}) < len(self.items):
            raise DiffmemError("items of a scene need distinct categories")

    @property
    def content(self) -> tuple:
        """What a full caption says about the scene (everything but the source images)."""
        return self.background, tuple((i.category, i.colour, i.position) for i in self.items)


class ItemPool:
    """Unused image indices of one split of ``source`` per class, handed out in a seeded random order; with
    ``cycle`` a class whose images are all used starts over in a new order."""

    def __init__(
        self, labels: np.ndarray, rng: np.random.Generator, source: str = FASHION_MNIST, cycle: bool = False
    ) -> None:
        self.source = source
        self._labels, self._rng, self._cycle = labels, rng, cycle
        self._unused = {c: self._shuffled(c) for c in range(NUM_CATEGORIES)}

    def take(self, category: int) -> int:
        """An index of class ``category`` that no earlier call returned (since the class started over)."""
        if not self._unused[category] and self._cycle:
            self._unused[category] = self._shuffled(category)
        if not self._unused[category]:
            name = image_source(self.source).class_names[category]
            raise DiffmemError(
                f"no unused {self.source} images of class {name!r} are left: build fewer or smaller scenes"
            )
        return int(self._unused[category].pop())

    def _shuffled(self, category: int) -> list[int]:
        return list(self._rng.permutation(np.flatnonzero(self._labels == category)))


def random_scene(rng: np.random.Generator, pool: ItemPool, num_items: int | None = None) -> Scene:
    """A scene with random background, categories, colours and positions; item images come from ``pool``."""
    if num_items is None:
        num_items = int(rng.choice(list(NUM_ITEMS_WEIGHTS), p=list(NUM_ITEMS_WEIGHTS.values())))
    if not 1 <= num_items <= MAX_ITEMS:
        raise DiffmemError(f"a scene holds 1 to {MAX_ITEMS} items, not {num_items}")
    positions = [POSITIONS[rng.integers(len(POSITIONS))]] if num_items == 1 else list(QUADRANTS)
    positions = [positions[i] for i in rng.permutation(len(positions))[:num_items]]
    categories = rng.choice(NUM_CATEGORIES, size=num_items, replace=False)
    colours = list(ITEM_COLOURS)
    items = tuple(
        Item(
            int(category),
            colours[rng.integers(len(colours))],
            position,
            pool.take(int(category)),
            pool.source,
        )
        for category, position in zip(categories, positions, strict=True)
    )
    backgrounds = list(BACKGROUND_COLOURS)
    return Scene(backgrounds[rng.integers(len(backgrounds))], items)


def render(scene: Scene, images: np.ndarray, size: int = 64, pattern: float = 0.0) -> np.ndarray:
    """The scene as uint8 [size, size, 3]; ``images`` is the split of the items' source they index into.

    Each item's grayscale intensity is its opacity over the background, in the item's colour. With
    ``pattern`` > 0 the background carries the scene's own ``background_pattern`` at that strength.
    """
    if size < 8 or size % 4:
        raise DiffmemError(f"scene size must be a multiple of 4 and at least 8, not {size}")
    check_pattern_strength(pattern)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_COLOURS[scene.background]
    if pattern > 0:
        shade = background_pattern(scene, size, pattern)[..., None]
        canvas += np.abs(shade) * (np.where(shade > 0, 255.0, 0.0) - canvas)  # tint up, shade down
    for item in scene.items:
        top, left, extent = position_box(item.position, size)
        resized = Image.fromarray(images[item.source_index]).resize(
            (extent, extent), Image.Resampling.LANCZOS
        )
        alpha = np.asarray(resized, dtype=np.float32)[..., None] / 255.0
        region = canvas[top : top + extent, left : left + extent]
        region += alpha * (np.asarray(ITEM_COLOURS[item.colour], dtype=np.float32) - region)
    return np.rint(canvas).astype(np.uint8)


def check_pattern_strength(strength: float, name: str = "background pattern strength") -> None:
    """A background pattern's strength (called ``name`` in the error) must lie in [0, 1]; 0 is plain."""
    if not 0.0 <= strength <= 1.0:
        raise DiffmemError(f"{name} must be in [0, 1], not {strength}")


def background_pattern(scene: Scene, size: int, strength: float) -> np.ndarray:
    """[size, size] blend weights in (-strength, strength): a smooth random field that is the scene's own.

    It stands for what real photographs hold and captions never state (texture, lighting): the
    caption names the background colour, the pattern tints it towards white (> 0) or shades it towards
    black (< 0). Seeded by the scene's contents and item images, so every copy of a scene has the same
    pattern and different scenes have independent ones.
    """
    rng = np.random.default_rng(_scene_key(scene))
    grid = rng.standard_normal((PATTERN_GRID, PATTERN_GRID)).astype(np.float32)
    field = np.asarray(
        Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    return strength * np.tanh(field / field.std())


def _scene_key(scene: Scene) -> list[int]:
    """Integers that identify a scene: background, then each item's category, colour, position, image."""
    key = [list(BACKGROUND_COLOURS).index(scene.background)]
    for item in scene.items:
        colour, position = list(ITEM_COLOURS).index(item.colour), POSITIONS.index(item.position)
        key += [item.category, colour, position, item.source_index]
    return key


def position_box(position: str, size: int) -> tuple[int, int, int]:
    """Top row, left column and side length of the square an item at ``position`` fills."""
    if position == CENTER:
        extent = size * 3 // 4
        return (size - extent) // 2, (size - extent) // 2, extent
    half = size // 2
    row, column = divmod(QUADRANTS.index(position), 2)
    return row * half, column * half, half
