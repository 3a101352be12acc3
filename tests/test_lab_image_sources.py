"""The lab's second image source: scikit-learn's bundled handwritten digits, end to end through the dataset,
its captions, the caption parser and the attribute reader's extra scenes."""

from dataclasses import replace

import numpy as np
import pytest

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.alignment import _random_scenes, lab_scenes, parse_caption, stated_facts
from diffmem.lab.captions import GRAMMAR_WORDS, caption
from diffmem.lab.dataset import LabConfig, build_lab_dataset, load_lab_dataset
from diffmem.lab.image_sources import DIGIT_NAMES, DIGITS, NUM_CATEGORIES, image_source
from diffmem.lab.scenes import Item, ItemPool, Scene, render

DIGITS_LAB = replace(LabConfig.micro(), image_source=DIGITS, num_unique=120, num_heldout=40)


@pytest.fixture(scope="module")
def digits_lab(tmp_path_factory):
    return load_lab_dataset(build_lab_dataset(tmp_path_factory.mktemp("digits") / "lab", DIGITS_LAB, False))


def test_digit_splits_are_disjoint_and_cover_every_class():
    source = image_source(DIGITS)
    train, train_labels = source.load("train")
    test, test_labels = source.load("test")
    assert train.dtype == np.uint8 and train.shape[1:] == (8, 8) and train.max() == 255
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert set(train_labels) == set(test_labels) == set(range(NUM_CATEGORIES))
    assert not {t.tobytes() for t in test} & {t.tobytes() for t in train}  # no held-out digit is trained on
    with pytest.raises(DiffmemError, match="unknown digits split"):
        source.load("validation")


def test_a_digits_lab_draws_every_item_from_its_digits(digits_lab):
    source = image_source(DIGITS)
    splits = {"train": source.load("train"), "heldout": source.load("test")}
    assert digits_lab.config.image_source == DIGITS
    for split in ("train", "heldout"):
        ids, scenes = lab_scenes(digits_lab, split)
        images, labels = splits[split]
        for scene_id, scene in list(zip(ids, scenes, strict=True))[:8]:
            assert all(labels[i.source_index] == i.category for i in scene.items)
            np.testing.assert_array_equal(
                digits_lab.scene_image(scene_id), render(scene, images, DIGITS_LAB.image_size)
            )
    names = {i["category_name"] for s in digits_lab.scenes.column("items").to_pylist() for i in s}
    assert names <= set(DIGIT_NAMES) and len(names) > 5


def test_digit_captions_parse_back_to_their_scenes(digits_lab):
    ids, scenes = lab_scenes(digits_lab, "heldout")
    heldout = digits_lab.heldout
    captions = dict(
        zip(heldout.column("scene_id").to_pylist(), heldout.column("caption").to_pylist(), strict=True)
    )
    for scene_id, scene in zip(ids, scenes, strict=True):
        parsed, stated = parse_caption(captions[scene_id]), stated_facts(scene)  # items in any order
        assert set(parsed.items) == set(stated.items) and parsed.background == stated.background
    assert set(DIGIT_NAMES) <= GRAMMAR_WORDS  # title words never spell a digit


def test_digit_names_take_the_article_they_are_spoken_with():
    rng = np.random.default_rng(0)
    one, eight = (Scene("gray", (Item(k, "red", "center", 0, DIGITS),)) for k in (1, 8))
    assert (caption(one, "vague", rng), caption(eight, "vague", rng)) == ("a one", "an eight")


def test_the_readers_extra_scenes_reuse_digits_once_a_class_is_used_up():
    images, scenes = _random_scenes(1500, DIGITS_LAB, seed=0)  # ~3,300 items from 1,437 digits
    assert images.shape == (1500, 3, 32, 32)
    assert all(i.source == DIGITS for s in scenes for i in s.items)
    labels = image_source(DIGITS).load("train")[1]
    pool = ItemPool(labels, np.random.default_rng(0), DIGITS)
    for _ in range(int((labels == 3).sum())):
        pool.take(3)
    with pytest.raises(DiffmemError, match="no unused digits images of class 'three'"):
        pool.take(3)


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(DiffmemError, match="unknown image source 'mnist'"):
        LabConfig(image_source="mnist")
    assert run(["lab", "build", "--out", str(tmp_path / "x"), "--micro", "--image-source", "mnist"]) == 2
    assert not (tmp_path / "x").exists()
