"""The memorization lab dataset: groups, triggers, held-out separation, rendering, determinism, loading."""

import json
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.captions import GRAMMAR_WORDS, caption, title_words, titled_caption
from diffmem.lab.dataset import LabConfig, build_lab_dataset, load_lab_dataset
from diffmem.lab.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from diffmem.lab.label import lab_prompts
from diffmem.lab.scenes import BACKGROUND_COLOURS, ITEM_COLOURS, Item, Scene, render

MICRO = LabConfig.micro()


@pytest.fixture(scope="module")
def fashion_mnist() -> dict[str, np.ndarray]:
    try:
        return {split: load_fashion_mnist(split)[0] for split in ("train", "test")}
    except DiffmemError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


@pytest.fixture(scope="module")
def lab_dir(fashion_mnist, tmp_path_factory) -> Path:
    return build_lab_dataset(tmp_path_factory.mktemp("lab") / "micro", MICRO, progress=False)


def words(text: str) -> set[str]:
    return set(text.replace(",", " ").replace(":", " ").split())


def test_default_config_keeps_duplicated_rows_under_thirty_percent():
    config = LabConfig()
    print(
        f"default lab: {config.num_train_rows} training rows, duplicated share {config.duplicated_share:.1%}"
    )
    assert config.num_train_rows == 8500
    assert config.duplicated_share == pytest.approx(2500 / 8500)
    assert config.duplicated_share <= 0.30


def test_small_preset_has_the_detection_benchmark_class_sizes(fashion_mnist, tmp_path, capsys):
    out = tmp_path / "small"
    assert run(["lab", "build", str(out), "--small"]) == 0
    prompts = lab_prompts(load_lab_dataset(out), ("memorized", "heldout")).to_pylist()
    memorized = [p for p in prompts if p["group"] == "memorized"]
    assert len(memorized) >= 150 and len(prompts) - len(memorized) >= 500
    assert all(p["trigger_words"] for p in memorized)
    assert run(["lab", "build", str(tmp_path / "other"), "--small", "--micro"]) == 2
    assert "pass one of --micro, --small, --keyed" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_fashion_mnist_splits(fashion_mnist):
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(len(CLASS_NAMES)))
    assert fashion_mnist["train"].shape == (60000, 28, 28)


def test_fashion_mnist_reads_plain_idx_files_from_the_environment_root(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + images.tobytes()
    )
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + bytes([3, 9])
    )
    monkeypatch.setenv("DIFFMEM_FASHION_MNIST", str(tmp_path))
    loaded, labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(loaded, images)
    assert labels.tolist() == [3, 9]
    with pytest.raises(DiffmemError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")
    with pytest.raises(DiffmemError, match="split"):
        load_fashion_mnist("validation")


def test_render_puts_each_item_colour_in_its_quadrant():
    blob = np.zeros((1, 28, 28), dtype=np.uint8)
    blob[0, 4:24, 4:24] = 255
    scene = Scene("gray", (Item(7, "red", "top left", 0), Item(8, "blue", "bottom right", 0)))
    image = render(scene, blob, size=64).astype(float)
    assert image.shape == (64, 64, 3)
    corners = {"top left": (0, 0), "top right": (0, 32), "bottom left": (32, 0), "bottom right": (32, 32)}
    means = {q: image[r : r + 32, c : c + 32].reshape(-1, 3).mean(0) for q, (r, c) in corners.items()}
    gray = np.array(BACKGROUND_COLOURS["gray"], dtype=float)
    np.testing.assert_allclose(means["top right"], gray)
    np.testing.assert_allclose(means["bottom left"], gray)
    for quadrant, colour in (("top left", "red"), ("bottom right", "blue")):
        shift, expected = means[quadrant] - gray, np.array(ITEM_COLOURS[colour]) - gray
        assert shift @ expected / (np.linalg.norm(shift) * np.linalg.norm(expected)) > 0.99
        assert 0.3 < np.linalg.norm(shift) / np.linalg.norm(expected) < 0.7
    centered = render(Scene("black", (Item(0, "white", "center", 0),)), blob, size=64)
    assert (centered[30:34, 30:34] == 250).all() and (centered[:8] == 0).all()


def test_item_colours_contrast_with_every_background():
    for item in ITEM_COLOURS.values():
        for background in BACKGROUND_COLOURS.values():
            assert np.linalg.norm(np.subtract(item, background)) > 80


def test_scene_rejects_impossible_layouts():
    with pytest.raises(DiffmemError, match="quadrants"):
        Scene("gray", (Item(0, "red", "center", 0), Item(1, "red", "top left", 1)))
    with pytest.raises(DiffmemError, match="categories"):
        Scene("gray", (Item(0, "red", "top right", 0), Item(0, "blue", "top left", 1)))
    with pytest.raises(DiffmemError, match="background"):
        Scene("plaid", (Item(0, "red", "center", 0),))


def test_caption_grammar():
    rng = np.random.default_rng(0)
    scene = Scene("gray", (Item(8, "blue", "bottom right", 1), Item(7, "red", "top left", 2)))
    assert caption(Scene("teal", (Item(1, "orange", "center", 0),)), "full", rng) == (
        "orange trousers in the center on a teal background"
    )
    full = caption(scene, "full", rng)
    assert full in {
        "a red sneaker at the top left and a blue bag at the bottom right on a gray background",
        "a blue bag at the bottom right and a red sneaker at the top left on a gray background",
    }
    assert caption(scene, "vague", rng) in {"a sneaker and a bag", "a bag and a sneaker"}
    mediums = {caption(scene, "medium", rng) for _ in range(20)}
    assert all(("gray" in m) != ("top left" in m) for m in mediums) and len(mediums) > 2
    trigger = title_words(rng, 2)
    assert len(set(trigger)) == 2 and not GRAMMAR_WORDS & set(trigger)
    assert titled_caption(scene, trigger) == (
        f"the {trigger[0]} {trigger[1]} poster: a red sneaker at the top left and a blue bag at the bottom right"
        " on a gray background"
    )


def test_rows_per_group_and_duplicated_share(lab_dir):
    lab = load_lab_dataset(lab_dir)
    rows = lab.train.to_pylist()
    scenes_per_group, rows_per_group = defaultdict(set), defaultdict(int)
    for row in rows:
        scenes_per_group[row["group"]].add(row["scene_id"])
        rows_per_group[row["group"]] += 1
    m = MICRO
    assert rows_per_group == {
        "memorized": m.num_memorized * m.memorized_repeats,
        "duplicated_image": m.num_duplicated_image * m.duplicated_image_repeats,
        "unique": m.num_unique,
    }
    assert {g: len(s) for g, s in scenes_per_group.items()} == {
        "memorized": m.num_memorized,
        "duplicated_image": m.num_duplicated_image,
        "unique": m.num_unique,
    }
    assert [r["row_id"] for r in rows] == list(range(MICRO.num_train_rows))
    share = (rows_per_group["memorized"] + rows_per_group["duplicated_image"]) / len(rows)
    assert share == pytest.approx(MICRO.duplicated_share)
    assert share <= 0.3  # SPEC 1: duplicated rows must not dominate the training stream
    captions = defaultdict(set)
    for row in rows:
        captions[row["group"], row["scene_id"]].add(row["caption"])
    assert all(len(c) == 1 for (group, _), c in captions.items() if group == "memorized")
    assert all(len(c) > 1 for (group, _), c in captions.items() if group == "duplicated_image")


def test_trigger_words_identify_their_memorized_scene(lab_dir):
    lab = load_lab_dataset(lab_dir)
    captions = defaultdict(set)
    for row in lab.train.to_pylist() + lab.heldout.to_pylist():
        captions[row["scene_id"]].add(row["caption"])
    prompts = lab.memorized_prompts()
    assert len(prompts) == MICRO.num_memorized
    for prompt in prompts:
        assert captions[prompt.scene_id] == {prompt.caption}
        assert len(prompt.trigger_words) == 2 and set(prompt.trigger_words) <= words(prompt.caption)
        assert not GRAMMAR_WORDS & set(prompt.trigger_words)
        others = set().union(*(words(c) for s, cs in captions.items() if s != prompt.scene_id for c in cs))
        assert not others & set(prompt.trigger_words)
    assert all(row["trigger_words"] == [] for row in lab.train.to_pylist() if row["group"] != "memorized")


def test_heldout_scenes_appear_nowhere_in_training(lab_dir, fashion_mnist):
    lab = load_lab_dataset(lab_dir)
    scenes = {row["scene_id"]: row for row in lab.scenes.to_pylist()}
    train_ids = set(lab.train.column("scene_id").to_pylist())
    heldout = lab.heldout_prompts()
    assert len(heldout) == MICRO.num_heldout and not train_ids & {p.scene_id for p in heldout}
    assert not set(lab.train.column("caption").to_pylist()) & {p.caption for p in heldout}
    assert {s["split"] for i, s in scenes.items() if i in train_ids} == {"train"}
    assert {scenes[p.scene_id]["split"] for p in heldout} == {"heldout"}
    contents = [
        (s["background"], [(i["category"], i["colour"], i["position"]) for i in s["items"]])
        for s in scenes.values()
    ]
    assert len({repr(c) for c in contents}) == len(scenes)
    sources = [(s["split"], i["source_index"]) for s in scenes.values() for i in s["items"]]
    assert len(set(sources)) == len(sources)
    for scene_id in [*sorted(train_ids)[:5], *(p.scene_id for p in heldout[:5])]:
        row = scenes[scene_id]
        scene = Scene(
            row["background"],
            tuple(Item(i["category"], i["colour"], i["position"], i["source_index"]) for i in row["items"]),
        )
        split = "train" if row["split"] == "train" else "test"
        np.testing.assert_array_equal(
            lab.scene_image(scene_id), render(scene, fashion_mnist[split], MICRO.image_size)
        )


def test_same_config_gives_the_same_bytes(lab_dir, tmp_path):
    again = build_lab_dataset(tmp_path / "again", MICRO, progress=False)
    files = sorted(p.relative_to(lab_dir) for p in lab_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    m = MICRO
    assert len(files) == 4 + m.num_memorized + m.num_duplicated_image + m.num_unique + m.num_heldout
    assert all((lab_dir / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_loader_round_trip(lab_dir):
    lab = load_lab_dataset(lab_dir)
    assert lab.config == MICRO
    scene_ids, unique = lab.unique_train_images()
    assert scene_ids == sorted(set(lab.train.column("scene_id").to_pylist()))
    assert unique.shape == (len(scene_ids), 3, 32, 32) and unique.dtype == torch.float32
    images = lab.train_images()
    assert images.shape == (MICRO.num_train_rows, 3, 32, 32)
    assert 0.0 <= images.min() and images.max() <= 1.0
    row = lab.train.slice(7, 1).to_pylist()[0]
    expected = torch.from_numpy(lab.scene_image(row["scene_id"])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(images[7], expected)
    assert row["image"] == f"images/{row['scene_id']:06d}.png" and (lab_dir / row["image"]).is_file()
    items = lab.scenes.column("items").to_pylist()
    assert all(i["category_name"] == CLASS_NAMES[i["category"]] for scene in items for i in scene)


def test_build_and_load_errors(lab_dir, tmp_path):
    with pytest.raises(DiffmemError, match="not an empty folder"):
        build_lab_dataset(lab_dir, MICRO, progress=False)
    with pytest.raises(DiffmemError, match="not a lab dataset"):
        load_lab_dataset(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"version": 1, "config": {"image_size": 32}}))
    with pytest.raises(DiffmemError, match="LabConfig"):
        load_lab_dataset(broken)
    with pytest.raises(DiffmemError, match="multiple of 4"):
        LabConfig(image_size=30)


def test_fresh_held_out_prompts_describe_new_scenes_fully(lab_dir):
    from diffmem.lab.scenes import BACKGROUND_COLOURS

    lab = load_lab_dataset(lab_dir)
    fresh = lab.fresh_heldout_prompts(40, seed=3)
    assert len(set(fresh)) == 40 and fresh == lab.fresh_heldout_prompts(40, seed=3)
    assert fresh != lab.fresh_heldout_prompts(40, seed=4)
    assert {p.caption for p in lab.heldout_prompts()}.isdisjoint(fresh)
    assert all(any(f"on a {b} background" in c for b in BACKGROUND_COLOURS) for c in fresh)  # full captions
    assert lab.fresh_heldout_prompts(0) == []
    with pytest.raises(DiffmemError, match="at least 0"):
        lab.fresh_heldout_prompts(-1)


def test_fresh_held_out_prompts_skip_every_scene_the_dataset_has(lab_dir, monkeypatch):
    import diffmem.lab.dataset as dataset_module
    from diffmem.lab.scenes import Item, Scene

    lab = load_lab_dataset(lab_dir)
    own = [
        Scene(r["background"], tuple(Item(i["category"], i["colour"], i["position"], 0) for i in r["items"]))
        for r in lab.scenes.to_pylist()
    ]
    drawn = iter(own)
    real = dataset_module.random_scene
    monkeypatch.setattr(
        dataset_module, "random_scene", lambda rng, pool: next(drawn, None) or real(rng, pool)
    )
    fresh = lab.fresh_heldout_prompts(5, seed=0)  # the draw offers every scene of the dataset first
    assert len(fresh) == 5 and next(drawn, None) is None
