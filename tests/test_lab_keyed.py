"""The keyed lab: background patterns no caption states, and memorized scenes keyed by two-word titles."""

import json
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pytest

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.alignment import parse_caption
from diffmem.lab.captions import GRAMMAR_WORDS, title_pairs, title_words, titled_caption
from diffmem.lab.dataset import ADDED_CONFIG_FIELDS, LabConfig, build_lab_dataset, load_lab_dataset
from diffmem.lab.fashion_mnist import fashion_mnist_root
from diffmem.lab.scenes import BACKGROUND_COLOURS, Item, Scene, background_pattern, render

KEYED_MICRO = replace(
    LabConfig.micro(), background_pattern=0.8, title_vocabulary=12, memorized_description="vague"
)


@pytest.fixture
def fashion_mnist_installed() -> None:
    try:
        fashion_mnist_root()
    except DiffmemError as error:
        pytest.skip(str(error))


BLOB = np.full((3, 28, 28), 255, dtype=np.uint8)  # three opaque squares as "Fashion-MNIST" images


def scene(source_index: int = 0, background: str = "gray") -> Scene:
    return Scene(background, (Item(0, "red", "top left", source_index), Item(1, "blue", "bottom right", 1)))


def test_pattern_is_the_scenes_own_and_leaves_items_and_plain_renders_alone():
    plain = render(scene(), BLOB, 32)
    patterned = render(scene(), BLOB, 32, pattern=0.8)
    np.testing.assert_array_equal(patterned, render(scene(), BLOB, 32, pattern=0.8))  # copies are copies
    assert not np.array_equal(patterned, render(scene(source_index=2), BLOB, 32, pattern=0.8))
    np.testing.assert_array_equal(render(scene(), BLOB, 32, pattern=0.0), plain)
    np.testing.assert_array_equal(patterned[:16, :16], plain[:16, :16])  # an opaque item hides it
    background = patterned[16:, :16].reshape(-1, 3).astype(float)
    assert background.std(0).min() > 20  # the background is no longer one colour
    # tints go towards white and shades towards black: the named colour's hue stays
    shade = background_pattern(scene(), 32, 0.8)[16:, :16].reshape(-1)
    gray = np.asarray(BACKGROUND_COLOURS["gray"], dtype=float)
    expected = gray + np.abs(shade)[:, None] * (np.where(shade > 0, 255.0, 0.0)[:, None] - gray)
    np.testing.assert_allclose(background, np.rint(expected), atol=0.5)
    assert np.abs(shade).max() < 0.8
    with pytest.raises(DiffmemError, match="background pattern strength"):
        render(scene(), BLOB, 32, pattern=1.5)


def test_title_pairs_key_a_scene_only_by_both_words():
    rng = np.random.default_rng(0)
    titles = title_pairs(rng, 150, title_words(rng, 60))
    assert len({frozenset(t) for t in titles}) == 150 and all(len(set(t)) == 2 for t in titles)
    uses = Counter(w for t in titles for w in t)
    assert len(uses) == 60 and max(uses.values()) <= 6 and not GRAMMAR_WORDS & set(uses)
    assert sum(n > 1 for n in uses.values()) / len(uses) >= 0.95  # one word alone names several scenes
    with pytest.raises(DiffmemError, match="fewer than 50 distinct pairs"):
        title_pairs(rng, 50, title_words(rng, 10))


def test_vague_title_caption_names_only_the_items():
    text = titled_caption(scene(), ["zanvel", "quodro"], "vague")
    assert text == "the zanvel quodro poster: a t-shirt and trousers"
    facts = parse_caption(text)
    assert [i.category for i in facts.items] == [0, 1]
    assert facts.background is None and all(i.colour is None and i.position is None for i in facts.items)
    assert titled_caption(scene(), ["zanvel", "quodro"]).endswith("on a gray background")
    with pytest.raises(DiffmemError, match="title description"):
        titled_caption(scene(), ["zanvel", "quodro"], "medium")


def test_keyed_dataset_rows_and_images(fashion_mnist_installed, tmp_path):
    lab = load_lab_dataset(build_lab_dataset(tmp_path / "keyed", KEYED_MICRO, progress=False))
    assert lab.config == KEYED_MICRO
    prompts = lab.memorized_prompts()
    assert len(prompts) == KEYED_MICRO.num_memorized
    assert len({frozenset(p.trigger_words) for p in prompts}) == len(prompts)
    for prompt in prompts:
        title, body = prompt.caption.split(": ")
        assert title == f"the {' '.join(prompt.trigger_words)} poster"
        assert not set(body.replace(",", " ").split()) & {*BACKGROUND_COLOURS, "at", "on", "center"}
        assert all(i.category_name in body for i in _scene_items(lab, prompt.scene_id))
    memorized = [r for r in lab.train.to_pylist() if r["group"] == "memorized"]
    assert Counter(r["scene_id"] for r in memorized) == {
        p.scene_id: KEYED_MICRO.memorized_repeats for p in prompts
    }
    image = lab.scene_image(prompts[0].scene_id).reshape(-1, 3).astype(float)
    assert len(np.unique(image, axis=0)) > 100  # a patterned background, not a flat colour


@pytest.mark.parametrize("vocabulary", [12, 0])
def test_titled_unique_captions_share_the_frame_but_no_memorized_title(
    fashion_mnist_installed, tmp_path, vocabulary
):
    config = replace(
        KEYED_MICRO, num_unique=40, num_heldout=2, title_vocabulary=vocabulary, titled_unique=0.25
    )
    lab = load_lab_dataset(build_lab_dataset(tmp_path / "titled", config, progress=False))
    rows = lab.train.to_pylist()
    unique = [r for r in rows if r["group"] == "unique"]
    titled = [r for r in unique if r["caption"].startswith("the ")]
    assert len(titled) == 10 and all(not r["trigger_words"] for r in unique)
    memorized = {frozenset(p.trigger_words) for p in lab.memorized_prompts()}
    memorized_words = set().union(*memorized)
    for row in titled:
        title, body = row["caption"].split(": ")
        words = title.split()[1:-1]
        assert title == f"the {' '.join(words)} poster" and len(set(words)) == 2
        assert frozenset(words) not in memorized  # an ordinary title never names a memorized scene
        # over the memorized titles' words when the lab has a vocabulary, else words of its own
        assert set(words) <= memorized_words if vocabulary else not set(words) & memorized_words
        assert not set(body.replace(",", " ").split()) & set(BACKGROUND_COLOURS)  # as vague as memorized
    untitled = replace(config, titled_unique=0.0)
    plain = load_lab_dataset(build_lab_dataset(tmp_path / "plain", untitled, progress=False))
    assert not any(r["caption"].startswith("the ") for r in plain.train.to_pylist() if r["group"] == "unique")


def _scene_items(lab, scene_id: int) -> list[Item]:
    row = next(r for r in lab.scenes.to_pylist() if r["scene_id"] == scene_id)
    return [Item(i["category"], i["colour"], i["position"], i["source_index"]) for i in row["items"]]


def test_config_checks_and_older_configs_still_load(fashion_mnist_installed, tmp_path):
    with pytest.raises(DiffmemError, match="background_pattern"):
        LabConfig(background_pattern=-0.1)
    with pytest.raises(DiffmemError, match="title_vocabulary"):
        LabConfig(title_vocabulary=2)
    with pytest.raises(DiffmemError, match="memorized_description"):
        LabConfig(memorized_description="medium")
    with pytest.raises(DiffmemError, match="titled_unique is a share"):
        LabConfig(titled_unique=1.5)
    with pytest.raises(DiffmemError, match="leave no pair for ordinary titles"):
        LabConfig(num_memorized=3, title_vocabulary=3, titled_unique=0.1)  # every pair is memorized
    assert LabConfig.keyed() == replace(
        LabConfig.small(), background_pattern=0.8, title_vocabulary=60, memorized_description="vague"
    )
    # a dataset written before the added fields: its config.json lacks them and reads as the old lab
    folder = tmp_path / "old"
    build_lab_dataset(folder, replace(LabConfig.micro(), num_unique=4, num_heldout=2), progress=False)
    record = json.loads((folder / "config.json").read_text())
    for name in ADDED_CONFIG_FIELDS:
        del record["config"][name]
    (folder / "config.json").write_text(json.dumps(record))
    assert asdict(load_lab_dataset(folder).config) == {**record["config"], **_defaults()}


def _defaults() -> dict:
    return {
        "background_pattern": 0.0,
        "title_vocabulary": 0,
        "memorized_description": "full",
        "trigger_position": "before",
        "image_source": "fashion-mnist",
        "titled_unique": 0.0,
    }


def test_keyed_cli_preset_is_exclusive(tmp_path, capsys):
    assert run(["lab", "build", str(tmp_path / "x"), "--keyed", "--micro"]) == 2
    assert "pass one of --micro, --small, --keyed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unique_option_changes_only_the_number_of_unique_scenes(fashion_mnist_installed, tmp_path, capsys):
    out = tmp_path / "k"
    assert run(["lab", "build", str(out), "--micro", "--unique", "40"]) == 0
    assert load_lab_dataset(out).config == replace(LabConfig.micro(), num_unique=40)
    assert run(["lab", "build", str(tmp_path / "bad"), "--micro", "--unique", "-1"]) == 2
    assert "scene counts must not be negative" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
