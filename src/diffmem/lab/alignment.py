"""The lab's text-alignment score: how many of a prompt's facts an attribute reader finds in the image.

The lab's stand-in for CLIP score (Hessel et al., "CLIPScore", EMNLP 2021; SPEC §8): no CLIP weights
exist for Fashion-MNIST scenes, and the lab's prompts state checkable facts, so a small CNN, the
*attribute reader*, reads each image back into a scene (per position: empty or an item's category
and colour; the background colour), and an image's score is the share of its caption's stated facts
that the reading confirms, as GenEval (Ghosh et al., NeurIPS 2023) checks objects, positions and
colours with a detector. The reader's glimpse features also serve as the lab's FID/KID feature
network (:mod:`diffmem.metrics.quality`), the way Inception's pool layer does for photographs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.io.modules import load_module, save_module
from diffmem.lab.captions import SYLLABLES, TITLE_NOUN
from diffmem.lab.dataset import LabConfig, LabDataset
from diffmem.lab.image_sources import CATEGORY_OF, NUM_CATEGORIES, image_source
from diffmem.lab.scenes import (
    BACKGROUND_COLOURS,
    CENTER,
    ITEM_COLOURS,
    POSITIONS,
    QUADRANTS,
    Item,
    ItemPool,
    Scene,
    position_box,
    random_scene,
    render,
)
from diffmem.metrics.copy_detection import conv_block

EMPTY = NUM_CATEGORIES  # the category index a reading gives a position without an item
IGNORE = -100  # cross-entropy target of a colour at an empty position
KIND = "diffmem.attribute_reader"
FACT_KINDS = ("category", "position", "colour", "background")  # what a caption can state


@dataclass(frozen=True)
class StatedItem:
    """An item as a caption states it: its category always, its colour and position when said."""

    category: int
    colour: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class StatedFacts:
    """What a caption says about a scene: its items, and the background colour when said."""

    items: tuple[StatedItem, ...]
    background: str | None = None

    @property
    def num_facts(self) -> int:
        """Each item's category, colour and position where stated, and the background where stated."""
        return sum(_stated(self).values())


def stated_facts(scene: Scene) -> StatedFacts:
    """Everything a full caption of ``scene`` states."""
    items = tuple(StatedItem(i.category, i.colour, i.position) for i in scene.items)
    return StatedFacts(items, scene.background)


def _alternatives(words: Sequence[str]) -> str:
    """A regex group matching any of ``words``, longest first so "ankle boot" wins over a prefix."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_TITLE_WORD = rf"(?:{_alternatives(SYLLABLES)})+"  # a made-up title word, as captions.title_words makes them
_ITEM_PHRASE = re.compile(
    rf"(?:an? )?(?:(?P<colour>{_alternatives(list(ITEM_COLOURS))}) )?(?:{_TITLE_WORD} )*?"
    rf"(?P<category>{_alternatives(list(CATEGORY_OF))})"
    rf"(?: at the (?P<quadrant>{_alternatives(QUADRANTS)})| (?P<center>in the center))?"
)
_BACKGROUND = re.compile(rf" on an? (?P<background>{_alternatives(list(BACKGROUND_COLOURS))}) background$")
_TITLE = re.compile(rf"the [a-z ]+ {TITLE_NOUN}: ")
_TRAILING_TITLE = re.compile(rf": the [a-z ]+ {TITLE_NOUN}$")
_SEPARATOR = re.compile(r", | and ")


def parse_caption(text: str) -> StatedFacts:
    """The facts a caption of the lab grammar states (inverse of ``captions.caption`` and
    ``captions.titled_caption`` at every title position; a title's made-up words state nothing)."""
    body = text.strip()
    title = _TITLE.match(body)
    if title:
        body = body[title.end() :]
    trailing = _TRAILING_TITLE.search(body)
    if trailing:
        body = body[: trailing.start()]
    background = _BACKGROUND.search(body)
    if background:
        body = body[: background.start()]
    items = []
    for phrase in _SEPARATOR.split(body):
        match = _ITEM_PHRASE.fullmatch(phrase)
        if match is None:
            raise DiffmemError(
                f"{phrase!r} in caption {text!r} is not an item of the lab's caption grammar "
                "(e.g. 'a red sneaker at the top left'); write prompts with diffmem.lab.captions"
            )
        position = CENTER if match["center"] else match["quadrant"]
        items.append(StatedItem(CATEGORY_OF[match["category"]], match["colour"], position))
    return StatedFacts(tuple(items), background["background"] if background else None)


@dataclass(frozen=True)
class AttributeReaderConfig:
    """Shape of an :class:`AttributeReader`."""

    glimpse_size: int = 16  # each position's box is resized to glimpse_size x glimpse_size
    widths: tuple[int, ...] = (16, 32, 64)  # channels of each stride-2 block of the glimpse encoder
    item_dim: int = 64  # features per glimpse; FID and KID compare all five glimpses' features


class AttributeReader(nn.Module):
    """Images [B, 3, H, W] in [0, 1] of the lab's layout to logits of each position's category (or
    empty) and colour, and of the background.

    It looks at each position's box (a *glimpse*) with one shared encoder, so every item trains the
    same recognition whatever its position; each position's readout also sees the mean of all
    glimpses, which tells a center item from four quadrant items.
    """

    def __init__(self, config: AttributeReaderConfig | None = None):
        super().__init__()
        self.config = config or AttributeReaderConfig()
        self.encoder = GlimpseEncoder(self.config)
        self.num_item_logits = NUM_CATEGORIES + 1 + len(ITEM_COLOURS)
        self.item_head = nn.Linear(2 * self.config.item_dim, self.num_item_logits)
        self.position_bias = nn.Parameter(torch.zeros(len(POSITIONS), self.num_item_logits))
        self.background_head = nn.Linear(self.config.item_dim, len(BACKGROUND_COLOURS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Category logits [B, 5, 11], colour logits [B, 5, 8] and background logits [B, 5]."""
        glimpses = self.encoder(images)  # [B, 5, item_dim]
        context = glimpses.mean(1, keepdim=True).expand_as(glimpses)
        item = self.item_head(torch.cat([glimpses, context], dim=2)) + self.position_bias
        category, colour = item.split([NUM_CATEGORIES + 1, len(ITEM_COLOURS)], dim=2)
        return category, colour, self.background_head(glimpses.mean(1))


class GlimpseEncoder(nn.Module):
    """Square images [B, 3, S, S] in [0, 1], S a multiple of 4, to features [B, 5, item_dim] of the
    boxes of the five positions (in POSITIONS order)."""

    def __init__(self, config: AttributeReaderConfig):
        super().__init__()
        self.glimpse_size = config.glimpse_size
        blocks, channels = [], 3
        for width in config.widths:
            blocks.append(conv_block(channels, width))
            channels = width
        self.blocks = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.projection = nn.Sequential(nn.Linear(channels * 4, config.item_dim), nn.GELU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        if images.shape[-2] != size or size % 4:
            raise DiffmemError(
                f"the attribute reader reads square lab scenes of a side divisible by 4; got images of "
                f"shape {tuple(images.shape)}: resize them to the lab dataset's image size"
            )
        x = (images.float() - 0.5) / 0.25
        glimpse = (self.glimpse_size, self.glimpse_size)
        crops = [
            F.interpolate(
                x[..., top : top + extent, left : left + extent], glimpse, mode="bilinear", antialias=True
            )
            for top, left, extent in (position_box(position, size) for position in POSITIONS)
        ]
        features = self.projection(self.blocks(torch.stack(crops, dim=1).flatten(0, 1)))
        return features.view(len(images), len(POSITIONS), -1)


@dataclass(frozen=True)
class SceneReading:
    """What a reader sees in a batch of images, as indices."""

    category: torch.Tensor  # [B, 5] category per position (in POSITIONS order); EMPTY where none
    colour: torch.Tensor  # [B, 5] index into ITEM_COLOURS per position (meaningless where empty)
    background: torch.Tensor  # [B] index into BACKGROUND_COLOURS


@torch.no_grad()
def read(reader: AttributeReader, images: torch.Tensor, batch_size: int = 256) -> SceneReading:
    """The reader's most likely reading of each of ``images`` [B, 3, H, W] in [0, 1], on the CPU."""
    device = next(reader.parameters()).device
    parts = [reader(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    category, colour, background = (torch.cat([p[k] for p in parts]).argmax(-1).cpu() for k in range(3))
    return SceneReading(category, colour, background)


def scene_targets(scenes: Sequence[Scene]) -> SceneReading:
    """The reading a perfect reader gives of ``scenes``; colours at empty positions are IGNORE."""
    category = torch.full((len(scenes), len(POSITIONS)), EMPTY)
    colour = torch.full((len(scenes), len(POSITIONS)), IGNORE)
    colours, backgrounds = list(ITEM_COLOURS), list(BACKGROUND_COLOURS)
    for row, scene in enumerate(scenes):
        for item in scene.items:
            category[row, POSITIONS.index(item.position)] = item.category
            colour[row, POSITIONS.index(item.position)] = colours.index(item.colour)
    background = torch.tensor([backgrounds.index(s.background) for s in scenes])
    return SceneReading(category, colour, background)


def alignment(
    reader: AttributeReader, images: torch.Tensor, prompts: Sequence[Scene | StatedFacts | str]
) -> torch.Tensor:
    """[B] share of each prompt's stated facts the reader finds in its image [B, 3, H, W] in [0, 1].

    A prompt is a lab caption, its parsed facts or a scene (all its facts). An item's category is
    found if read at any position; its position if its category is read there; its colour if its
    category is read in that colour at the stated position, or, with none stated, at any position.
    """
    facts, found = _read_facts(reader, images, prompts)
    return torch.tensor([sum(n.values()) / f.num_facts for n, f in zip(found, facts, strict=True)])


def fact_recall(
    reader: AttributeReader, images: torch.Tensor, prompts: Sequence[Scene | StatedFacts | str]
) -> dict[str, float]:
    """Of each kind of fact (FACT_KINDS) the prompts state, the share the reader finds in their images,
    as :func:`alignment` counts them; kinds no prompt states are left out."""
    facts, found = _read_facts(reader, images, prompts)
    counts = [_stated(f) for f in facts]
    stated = {kind: sum(c[kind] for c in counts) for kind in FACT_KINDS}
    return {kind: sum(n[kind] for n in found) / stated[kind] for kind in FACT_KINDS if stated[kind]}


def _read_facts(
    reader: AttributeReader, images: torch.Tensor, prompts: Sequence[Scene | StatedFacts | str]
) -> tuple[list[StatedFacts], list[dict[str, int]]]:
    """Each prompt's facts and, by kind, how many of them the reading of its image confirms."""
    if len(images) != len(prompts):
        raise DiffmemError(f"alignment needs one prompt per image; got {len(images)} images, {len(prompts)}")
    reading = read(reader, images)
    facts = [_as_facts(p) for p in prompts]
    return facts, [_facts_found(reading, row, f) for row, f in enumerate(facts)]


def _as_facts(prompt: Scene | StatedFacts | str) -> StatedFacts:
    if isinstance(prompt, Scene):
        return stated_facts(prompt)
    return parse_caption(prompt) if isinstance(prompt, str) else prompt


def _stated(facts: StatedFacts) -> dict[str, int]:
    """How many facts of each kind ``facts`` holds."""
    return {
        "category": len(facts.items),
        "position": sum(i.position is not None for i in facts.items),
        "colour": sum(i.colour is not None for i in facts.items),
        "background": int(facts.background is not None),
    }


def _facts_found(reading: SceneReading, row: int, facts: StatedFacts) -> dict[str, int]:
    """How many of ``facts``, by kind, the reading of image ``row`` confirms."""
    category, colour = reading.category[row].tolist(), reading.colour[row].tolist()
    colours = list(ITEM_COLOURS)
    found = dict.fromkeys(FACT_KINDS, 0)
    for item in facts.items:
        where = [p for p, c in enumerate(category) if c == item.category]
        found["category"] += bool(where)
        if item.position is not None:
            at = POSITIONS.index(item.position)
            found["position"] += at in where
            where = [at] if at in where else []
        if item.colour is not None:
            found["colour"] += any(colours[colour[p]] == item.colour for p in where)
    if facts.background is not None:
        found["background"] += list(BACKGROUND_COLOURS)[int(reading.background[row])] == facts.background
    return found


@dataclass(frozen=True)
class ReaderAccuracy:
    """How well a reader reads scenes whose truth is known."""

    item_category: float  # share of items whose category is read at their position
    item_colour: float  # share of items whose colour is read at their position
    empty: float  # share of empty positions read as empty
    background: float  # share of images whose background is read right
    scene: float  # share of images read entirely right

    def to_dict(self) -> dict:
        """The accuracies as plain JSON-ready values."""
        return asdict(self)


def reader_accuracy(reader: AttributeReader, images: torch.Tensor, scenes: Sequence[Scene]) -> ReaderAccuracy:
    """Accuracy of ``reader`` on ``images`` [B, 3, H, W] whose true scenes are ``scenes``."""
    reading, truth = read(reader, images), scene_targets(scenes)
    occupied = truth.category != EMPTY
    category_right = reading.category == truth.category
    colour_right = (reading.colour == truth.colour) | ~occupied
    background_right = reading.background == truth.background
    return ReaderAccuracy(
        item_category=float(category_right[occupied].float().mean()),
        item_colour=float(colour_right[occupied].float().mean()),
        empty=float(category_right[~occupied].float().mean()),
        background=float(background_right.float().mean()),
        scene=float((category_right.all(1) & colour_right.all(1) & background_right).float().mean()),
    )


def lab_scenes(dataset: LabDataset, split: str) -> tuple[list[int], list[Scene]]:
    """The ids (ascending) and scenes of the "train" or "heldout" split of ``dataset``."""
    if split not in ("train", "heldout"):
        raise DiffmemError(f"unknown lab split {split!r}; use 'train' or 'heldout'")
    rows = [r for r in dataset.scenes.sort_by("scene_id").to_pylist() if r["split"] == split]
    source = dataset.config.image_source
    scenes = [
        Scene(
            r["background"],
            tuple(
                Item(i["category"], i["colour"], i["position"], i["source_index"], source) for i in r["items"]
            ),
        )
        for r in rows
    ]
    return [r["scene_id"] for r in rows], scenes


def train_attribute_reader(
    dataset: LabDataset,
    steps: int,
    extra_scenes: int = 20_000,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise_std: float = 0.05,
    seed: int = 0,
    config: AttributeReaderConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> AttributeReader:
    """Train a reader on the training scenes of ``dataset`` and ``extra_scenes`` random scenes rendered
    from the training split of its image source; held-out scenes stay unseen. Returns it in eval mode.

    Each step draws ``batch_size`` scenes, adds Gaussian noise of a random std up to ``noise_std`` to
    half of them (generations are never quite clean) and lowers the cross-entropy of every position's
    category (or empty), every item's colour and the background.
    """
    config = config or AttributeReaderConfig()
    generator = torch.Generator().manual_seed(seed)
    _, scenes = lab_scenes(dataset, "train")
    images = (dataset.unique_train_images()[1] * 255).round().to(torch.uint8)
    if extra_scenes > 0:
        extra_images, extra = _random_scenes(extra_scenes, dataset.config, seed)
        images, scenes = torch.cat([images, extra_images]), scenes + extra
    targets = scene_targets(scenes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reader = AttributeReader(config).to(device).train()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )  # cosine decay to 0
    for _ in tqdm(range(steps), desc="attribute reader", disable=not progress):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = _add_noise(images[index].float() / 255.0, noise_std, generator).to(device)
        category, colour, background = reader(batch)
        loss = (
            F.cross_entropy(category.flatten(0, 1), targets.category[index].flatten().to(device))
            + F.cross_entropy(colour.flatten(0, 1), targets.colour[index].flatten().to(device))
            + F.cross_entropy(background, targets.background[index].to(device))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return reader.eval()


def _random_scenes(n: int, lab: LabConfig, seed: int) -> tuple[torch.Tensor, list[Scene]]:
    """``n`` random scenes of the lab's image source's training images (each used again once its class
    has used all), rendered as the lab renders its scenes: uint8 [n, 3, size, size]."""
    images, labels = image_source(lab.image_source).load("train")
    rng = np.random.default_rng([seed, n])
    pool = ItemPool(labels, rng, lab.image_source, cycle=True)
    scenes = [random_scene(rng, pool) for _ in range(n)]
    rendered = np.stack([render(s, images, lab.image_size, lab.background_pattern) for s in scenes])
    return torch.from_numpy(rendered).permute(0, 3, 1, 2).contiguous(), scenes


def _add_noise(images: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """Half the images, drawn at random, get Gaussian noise of a random std up to ``max_std``."""
    n = len(images)
    std = max_std * torch.rand(n, generator=generator) * (torch.rand(n, generator=generator) < 0.5)
    noise = torch.randn(images.shape, generator=generator)
    return (images + std.view(n, 1, 1, 1) * noise).clamp(0.0, 1.0)


def save_reader(reader: AttributeReader, path: str | Path) -> None:
    """Write ``reader`` to the directory ``path``: ``config.json`` and ``model.safetensors``."""
    save_module(reader, reader.config, path, KIND)


def load_reader(path: str | Path, device: str | torch.device = "cpu") -> AttributeReader:
    """Open a reader written by :func:`save_reader`, in eval mode."""
    build = lambda config: AttributeReader(AttributeReaderConfig(**config))
    return load_module(path, KIND, build, "attribute reader (save_reader)", device)
