"""The lab's quality and text-alignment measures: caption parsing, the attribute reader, FID and KID."""

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.lab.alignment import (
    AttributeReader,
    SceneReading,
    StatedFacts,
    StatedItem,
    alignment,
    fact_recall,
    lab_scenes,
    load_reader,
    parse_caption,
    reader_accuracy,
    save_reader,
    scene_targets,
    stated_facts,
    train_attribute_reader,
)
from diffmem.lab.captions import SPECIFICITIES, caption, title_words, titled_caption
from diffmem.lab.dataset import LabConfig, LabDataset, build_lab_dataset, load_lab_dataset
from diffmem.lab.fashion_mnist import load_fashion_mnist
from diffmem.lab.scenes import Item, Scene
from diffmem.metrics.quality import FeatureNet, fid, kid

MICRO = LabConfig.micro()
SNEAKER, BAG = 7, 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reader is tiny: one thread trains it fastest and never waits on a second, busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> LabDataset:
    try:
        load_fashion_mnist("train")
    except DiffmemError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    return load_lab_dataset(
        build_lab_dataset(tmp_path_factory.mktemp("lab") / "micro", MICRO, progress=False)
    )


@pytest.fixture(scope="module")
def reader(lab) -> AttributeReader:
    return train_attribute_reader(lab, steps=200, extra_scenes=1000, progress=False)


@pytest.fixture(scope="module")
def heldout(lab) -> tuple[torch.Tensor, list[Scene]]:
    scene_ids, scenes = lab_scenes(lab, "heldout")
    return lab.images(scene_ids), scenes


class PerfectReader(nn.Module):
    """Reads any batch as the given scenes, with certainty."""

    def __init__(self, scenes: list[Scene]):
        super().__init__()
        self.truth = scene_targets(scenes)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert len(images) == len(self.truth.background)
        return (
            F.one_hot(self.truth.category, 11).float(),
            F.one_hot(self.truth.colour.clamp_min(0), 8).float(),
            F.one_hot(self.truth.background, 5).float(),
        )


def two_items(sneaker: tuple[str, str], bag: tuple[str, str]) -> Scene:
    """A gray scene of a sneaker and a bag, each given as (colour, position)."""
    return Scene("gray", (Item(SNEAKER, *sneaker, 0), Item(BAG, *bag, 0)))


def test_parse_caption_reads_the_grammar():
    assert parse_caption("orange trousers in the center on a teal background") == StatedFacts(
        (StatedItem(1, "orange", "center"),), "teal"
    )
    assert parse_caption("an ankle boot, a t-shirt and trousers") == StatedFacts(
        (StatedItem(9), StatedItem(0), StatedItem(1))
    )
    assert parse_caption("the velmau kexfen poster: a red sneaker at the top left on a navy background") == (
        StatedFacts((StatedItem(SNEAKER, "red", "top left"),), "navy")
    )
    assert parse_caption("a white bag and a pink sneaker").num_facts == 4
    with pytest.raises(DiffmemError, match="caption grammar"):
        parse_caption("a purple elephant at the top left")
    with pytest.raises(DiffmemError, match="caption grammar"):
        parse_caption("a red sneaker at the far left")


def test_parse_caption_round_trips_every_caption_of_the_micro_lab(lab):
    ids, scenes = lab_scenes(lab, "train")
    heldout_ids, heldout_scenes = lab_scenes(lab, "heldout")
    by_id = dict(zip(ids + heldout_ids, scenes + heldout_scenes, strict=True))
    rows = lab.train.to_pylist() + lab.heldout.to_pylist()
    for row in rows:
        parsed, truth = parse_caption(row["caption"]), stated_facts(by_id[row["scene_id"]])
        assert parsed.background in (None, truth.background)
        assert sorted(i.category for i in parsed.items) == sorted(i.category for i in truth.items)
        for item in parsed.items:
            full = next(t for t in truth.items if t.category == item.category)
            assert item.colour in (None, full.colour) and item.position in (None, full.position)
    rng = np.random.default_rng(0)
    for scene in by_id.values():
        truth = stated_facts(scene)
        parsed = {s: parse_caption(caption(scene, s, rng)) for s in SPECIFICITIES}
        assert set(parsed["full"].items) == set(truth.items) and parsed["full"].background == scene.background
        assert set(parse_caption(titled_caption(scene, title_words(rng))).items) == set(truth.items)
        medium = parsed["medium"]
        with_positions = medium.items[0].position is not None
        assert medium.background == (None if with_positions else scene.background)
        stated = {
            StatedItem(i.category, i.colour, i.position if with_positions else None) for i in truth.items
        }
        assert set(medium.items) == stated
        assert parsed["vague"] == StatedFacts(tuple(StatedItem(i.category) for i in parsed["vague"].items))
        assert {i.category for i in parsed["vague"].items} == {i.category for i in truth.items}


def test_alignment_counts_the_facts_a_perfect_reading_confirms():
    scene = two_items(("red", "top left"), ("blue", "bottom right"))
    full = "a red sneaker at the top left and a blue bag at the bottom right on a gray background"
    medium = "a red sneaker and a blue bag on a gray background"
    prompts = [full, medium, "a sneaker and a bag", scene]
    perfect = alignment(PerfectReader([scene] * 4), torch.zeros(4, 3, 32, 32), prompts)
    torch.testing.assert_close(perfect, torch.ones(4))
    swapped_positions = two_items(("red", "bottom right"), ("blue", "top left"))
    swapped_colours = two_items(("blue", "top left"), ("red", "bottom right"))
    readings = [swapped_positions, swapped_positions, swapped_colours, swapped_colours]
    scores = alignment(PerfectReader(readings), torch.zeros(4, 3, 32, 32), [full, medium, full, medium])
    # categories and background hold; positions fail and so do colours bound to them; without
    # positions the colours bind to where each category is read
    torch.testing.assert_close(scores, torch.tensor([3 / 7, 1.0, 5 / 7, 3 / 5]))
    with pytest.raises(DiffmemError, match="one prompt per image"):
        alignment(PerfectReader([scene]), torch.zeros(1, 3, 32, 32), [full, full])


def test_fact_recall_splits_the_alignment_by_kind_of_fact():
    full = "a red sneaker at the top left and a blue bag at the bottom right on a gray background"
    swapped_positions = two_items(("red", "bottom right"), ("blue", "top left"))
    recall = fact_recall(
        PerfectReader([swapped_positions] * 2), torch.zeros(2, 3, 32, 32), [full, "a sneaker"]
    )
    # 3 categories stated, all read; 2 positions, none right; their colours fail with them
    assert recall == {"category": 1.0, "position": 0.0, "colour": 0.0, "background": 1.0}
    only_items = fact_recall(
        PerfectReader([swapped_positions]), torch.zeros(1, 3, 32, 32), ["a sneaker and a bag"]
    )
    assert only_items == {"category": 1.0}  # kinds no prompt states are left out


def test_trained_reader_aligns_heldout_images_with_their_own_captions(reader, heldout, lab):
    images, scenes = heldout
    accuracy = reader_accuracy(reader, images, scenes)
    print(f"micro reader after 200 steps: {accuracy}")
    assert accuracy.item_colour > 0.9 and accuracy.background > 0.9 and accuracy.empty > 0.9
    captions = [p.caption for p in lab.heldout_prompts()]
    own = alignment(reader, images, captions)
    shuffled = alignment(reader, images, captions[1:] + captions[:1])
    print(f"alignment with own captions {own.mean():.3f}, with shuffled captions {shuffled.mean():.3f}")
    assert own.shape == (len(images),) and 0 <= own.min() and own.max() <= 1
    assert own.mean() > 0.55 and shuffled.mean() < 0.25


def test_reader_save_load_round_trip(reader, heldout, tmp_path):
    images = heldout[0][:8]
    save_reader(reader, tmp_path / "reader")
    loaded = load_reader(tmp_path / "reader")
    assert loaded.config == reader.config and not loaded.training
    with torch.no_grad():
        for expected, actual in zip(reader(images), loaded(images), strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(DiffmemError, match="save_reader"):
        load_reader(tmp_path / "missing")
    config = json.loads((tmp_path / "reader" / "config.json").read_text())
    (tmp_path / "reader" / "config.json").write_text(json.dumps({**config, "kind": "other"}))
    with pytest.raises(DiffmemError, match="attribute reader"):
        load_reader(tmp_path / "reader")


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1.0)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    x = F.pad(images.reshape(-1, 1, *images.shape[2:]), (radius,) * 4, mode="reflect")
    return F.conv2d(x, kernel[None, None]).view_as(images)


def test_fid_and_kid_grow_with_noise_and_blur(reader, lab):
    _, images = lab.unique_train_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    real, other = images[order[: len(images) // 2]], images[order[len(images) // 2 :]]
    generator = torch.Generator().manual_seed(1)
    noisy = [(other + s * torch.randn(other.shape, generator=generator)).clamp(0, 1) for s in (0.1, 0.2, 0.4)]
    blurred = [blur(other, s) for s in (1.0, 2.0, 3.0)]
    for degraded in (noisy, blurred):
        fids = [fid(real, fake, reader.encoder) for fake in (other, *degraded)]
        kids = [kid(real, fake, reader.encoder, subset_size=100)[0] for fake in (other, *degraded)]
        print(f"FID {[round(f, 1) for f in fids]}, KID {[round(k, 2) for k in kids]}")
        assert all(a < b for a, b in pairwise(fids)) and all(a < b for a, b in pairwise(kids))
    assert fid(real, real, reader.encoder) == pytest.approx(0.0, abs=1e-3)


def test_quality_takes_any_feature_network_and_checks_its_input():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Dropout(0.5))
    real = torch.rand(64, 3, 8, 8)
    assert fid(real, real, encoder) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, (real + 0.3).clamp(0, 1), encoder) > 0.01
    net = FeatureNet(encoder, num_features=4).train()
    assert not net.training and not encoder.training and net.num_features == 4
    assert not net(real).requires_grad
    mean, std = kid(real, real.flip(0), net, subset_size=32, subsets=10)
    assert abs(mean) < 0.1 and std >= 0
    with pytest.raises(DiffmemError, match="at least 2"):
        fid(real[:1], real, encoder)
    with pytest.raises(DiffmemError, match="smaller subset_size"):
        kid(real, real, encoder, subset_size=100)
    with pytest.raises(DiffmemError, match=r"\[N, 3, H, W\]"):
        fid(real[:, 0], real, encoder)


def test_scene_targets_mark_empty_positions():
    targets = scene_targets([two_items(("red", "top left"), ("blue", "bottom right"))])
    assert isinstance(targets, SceneReading)
    assert targets.category.tolist() == [[SNEAKER, 10, 10, BAG, 10]]
    assert targets.colour.tolist() == [[0, -100, -100, 2, -100]]
    assert targets.background.tolist() == [0]
