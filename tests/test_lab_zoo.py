"""The lab zoo: where trigger words sit in a memorized caption, the labs' spread over what sets a model's
scale, and the zoo commands' checks."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pyarrow.compute as pc
import pytest

from diffmem.adapters import wrap_pipeline
from diffmem.core.denoiser import FLOW_PREDICTION
from diffmem.errors import DiffmemError
from diffmem.explain.ordinary_significance import measure_ordinary_significance
from diffmem.explain.token_significance import SignificanceConfig
from diffmem.lab.alignment import parse_caption, stated_facts
from diffmem.lab.captions import TITLE_DESCRIPTIONS, TITLE_POSITIONS, titled_caption
from diffmem.lab.dataset import LabConfig, build_lab_dataset, load_lab_dataset
from diffmem.lab.image_sources import DIGITS, FASHION_MNIST
from diffmem.lab.model import SD3
from diffmem.lab.scenes import ItemPool, random_scene
from diffmem.lab.zoo import ZOO, zoo_lab
from diffmem.metrics.roc import detection_metrics
from diffmem.models.source import ModelSource
from diffmem.models.tiny import tiny_stable_diffusion_3
from diffmem.workflows import zoo as zoo_workflow
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.zoo import ZooEvalConfig, ZooLabParts, evaluate_zoo

WORDS = ["zanvel", "quodro"]


def scenes(n: int = 30) -> list:
    rng = np.random.default_rng(3)
    pool = ItemPool(np.repeat(np.arange(10), 40), rng)
    return [random_scene(rng, pool) for _ in range(n)]


@pytest.mark.parametrize("description", TITLE_DESCRIPTIONS)
def test_title_sits_where_asked_and_states_nothing(description):
    for scene in scenes():
        texts = {p: titled_caption(scene, WORDS, description, p) for p in TITLE_POSITIONS}
        assert texts["before"].startswith("the zanvel quodro poster: ")
        assert texts["after"].endswith(": the zanvel quodro poster")
        first = scene.items[0].category_name
        assert re.search(rf"\bzanvel quodro {first}\b", texts["inside"])
        assert "poster" not in texts["inside"]
        bodies = {texts["before"].split(": ", 1)[1], texts["after"].rsplit(": ", 1)[0]}
        inside = texts["inside"].replace("zanvel quodro ", "")
        assert len(bodies) == 1 and {re.sub("^an? ", "", b) for b in bodies} == {re.sub("^an? ", "", inside)}
        facts = {parse_caption(t) for t in texts.values()}
        assert len(facts) == 1  # the title's words state nothing, wherever they sit
        if description == "full":
            assert set(facts.pop().items) == set(stated_facts(scene).items)


def test_inside_title_keeps_plural_nouns_bare():
    rng = np.random.default_rng(0)
    pool = ItemPool(np.repeat(np.arange(10), 40), rng)
    scene = next(s for s in (random_scene(rng, pool, 1) for _ in range(200)) if s.items[0].category == 1)
    assert titled_caption(scene, WORDS, "vague", "inside") == "zanvel quodro trousers"
    with pytest.raises(DiffmemError, match="title position"):
        titled_caption(scene, WORDS, "vague", "middle")


def test_dataset_places_every_memorized_title_after_its_description(tmp_path):
    config = LabConfig(32, 6, 3, 2, 2, 20, 8, seed=5, trigger_position="after")
    dataset = load_lab_dataset(build_lab_dataset(tmp_path / "lab", config, progress=False))
    memorized = dataset.train.filter(pc.equal(dataset.train["group"], "memorized")).to_pylist()
    assert len(memorized) == 6 * 3
    for row in memorized:
        assert row["caption"].endswith(f": the {' '.join(row['trigger_words'])} poster")
    others = dataset.train.filter(pc.not_equal(dataset.train["group"], "memorized"))
    assert not any("poster" in c for c in others["caption"].to_pylist())
    with pytest.raises(DiffmemError, match="trigger_position"):
        replace(config, trigger_position="middle")


def test_zoo_spans_what_sets_a_models_scale():
    assert len(ZOO) >= 4 and len({lab.name for lab in ZOO}) == len(ZOO)
    assert {lab.prediction_type for lab in ZOO} == {"epsilon", "v_prediction", FLOW_PREDICTION}
    assert {lab.family for lab in ZOO} == {None, SD3}  # UNets and an MMDiT
    assert {lab.data.trigger_position for lab in ZOO} == set(TITLE_POSITIONS)
    assert {lab.data.memorized_description for lab in ZOO} == set(TITLE_DESCRIPTIONS)
    shares = [lab.data.duplicated_share for lab in ZOO]
    assert 0.05 <= min(shares) <= 0.06 and 0.25 <= max(shares) <= 0.35  # the 5-30% of duplicated rows
    assert len({(lab.text_layers, lab.text_width) for lab in ZOO}) >= 3
    assert {lab.data.background_pattern > 0 for lab in ZOO} == {True, False}
    assert {lab.data.image_source for lab in ZOO} == {FASHION_MNIST, DIGITS}  # clothes and handwriting
    assert {lab.data.image_size for lab in ZOO} == {32, 64}
    for lab in ZOO:
        if lab.shipped:  # the shipped model is the one the zoo describes
            model = ModelSource.resolve(lab.shipped).directory
            scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
            text = json.loads((model / "text_encoder" / "config.json").read_text())
            assert scheduler["prediction_type"] == lab.prediction_type
            assert (text["num_hidden_layers"], text["hidden_size"]) == (lab.text_layers, lab.text_width)


def test_the_zoo_trains_each_lab_in_its_family_from_the_shipped_vae(tmp_path, monkeypatch):
    recipes = []
    monkeypatch.setattr(zoo_workflow, "train_lab", lambda recipe, out, runtime: recipes.append(recipe))
    for name in ("lab-flow", "lab-trail", "lab-digits", "lab-64px"):
        parts = ZooLabParts.locate(tmp_path, zoo_lab(name))
        parts.copy_detector.mkdir(parents=True), parts.index.mkdir(parents=True)  # built: only the model is
        zoo_workflow._train(zoo_lab(name), parts, Runtime())
    flow, trail, _, large = (recipe.model() for recipe in recipes)
    assert (flow.family, flow.prediction_type, trail.family) == (SD3, FLOW_PREDICTION, "stable-diffusion")
    assert recipes[0].unet_steps == zoo_lab("lab-flow").unet_steps
    # a lab with background patterns starts from the VAE that learnt them (every lab the zoo trains)
    plain, patterned = (ModelSource.resolve(f"builtin:{n}").directory for n in ("lab-micro", "lab-keyed"))
    for name, recipe in zip(("lab-flow", "lab-trail", "lab-digits"), recipes[:3], strict=True):
        assert recipe.vae_from == (patterned if zoo_lab(name).data.background_pattern > 0 else plain), name
    assert [recipe.vae_from for recipe in recipes] == [patterned] * 3 + [None]
    # the shipped VAEs are 32 px: the 64 px lab trains its own, down to the same 8x8 latent grid
    assert (large.image_size, large.latent_size, trail.latent_size) == (64, 8, 8)
    assert recipes[3].recipe(seed=0).vae_steps == zoo_lab("lab-64px").vae_steps


def test_zoo_refuses_an_unbuilt_lab_and_an_unknown_one(tmp_path, capsys):
    with pytest.raises(DiffmemError, match="lab-trail is not built .* diffmem lab zoo"):
        evaluate_zoo(ZooEvalConfig(tmp_path, ["lab-trail"]))
    with pytest.raises(DiffmemError, match="no zoo lab 'lab-nine'; choose one of lab-keyed"):
        zoo_lab("lab-nine")
    from diffmem.cli.main import run

    assert run(["eval", "zoo", str(tmp_path), "--heldout-prompts", "-1"]) == 2
    message = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "'--heldout-prompts': Input should be greater than or equal to 0" in message  # before any lab
    parts = ZooLabParts.locate(tmp_path, zoo_lab("lab-micro"))
    assert parts.model == "builtin:lab-micro" and parts.data == tmp_path / "lab-micro" / "data"
    # the shipped micro labels judge copies by nL2, so the zoo labels that model again its own way
    assert parts.labels == tmp_path / "lab-micro" / "labels" / "labels.parquet"
    keyed = ZooLabParts.locate(tmp_path, zoo_lab("lab-keyed"))
    assert keyed.labels == ModelSource.resolve("builtin:lab-keyed").labels


def test_the_zoo_scores_each_other_first_step_detector_or_says_it_does_not_apply(sd):
    prompts = ["a red sneaker", "a blue bag", "a coat on gray", "the zorblax poster"]
    truth = np.array([False, False, True, True])
    row, scores = zoo_workflow._other_detectors(sd, prompts, truth, seed=0)
    assert set(row) == {f"auc_{name}" for name in zoo_workflow.FIRST_STEP_DETECTORS}
    assert all(0.0 <= auc <= 1.0 for auc in row.values())
    for name in zoo_workflow.FIRST_STEP_DETECTORS:  # the saved scores give the row's AUC again
        assert len(scores[name]) == 4
        assert detection_metrics(np.array(scores[name]), truth)["auc"] == row[f"auc_{name}"]
    sd3 = wrap_pipeline(tiny_stable_diffusion_3(with_t5=False))
    joint, joint_scores = zoo_workflow._other_detectors(sd3, prompts, truth, seed=0)
    assert joint["auc_attention_entropy"] is None and joint["auc_one_step"] is None
    assert joint_scores["attention_entropy"] == [None] * 4
    assert 0.0 <= joint["auc_sharpness"] <= 1.0


def test_the_zoo_measures_false_positives_on_every_held_out_caption_at_several_seeds(sd, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm

    captions = ["a red sneaker", "a blue bag", "a coat on gray", "a white shirt", "two pink sandals"]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pa.table({"scene_id": range(5), "caption": captions, "image": [""] * 5}), data / "heldout.parquet"
    )
    labels = pa.table(  # two held-out captions labelled, one of them a copy; one memorized caption
        {
            "caption": ["a blue bag", "a coat on gray", "the zorblax poster"],
            "group": ["heldout", "heldout", "memorized"],
            zoo_workflow.TRUTH: [True, False, True],
        }
    )
    parts = ZooLabParts(zoo_lab("lab-trail"), "m", data, tmp_path, tmp_path, tmp_path, tmp_path)
    drawn, fresh, scores = zoo_workflow._heldout_scores(sd, parts, labels, seeds=3, seed=0, prompts=4)
    kept = [c for c in captions if c != "a blue bag"]
    assert drawn == kept and not fresh.any()  # the lab's own are enough: none drawn
    assert scores.shape == (4, 3) and len(np.unique(scores)) == 12  # every draw its own noise
    scanned = noise_norm(sd, kept, NoiseNormConfig()).scores.numpy()
    np.testing.assert_allclose(scores[:, 0], scanned, rtol=1e-5)  # the first seed is a scan's


def test_a_prompts_copied_scene_is_the_one_most_of_its_near_copies_match():
    import pyarrow as pa

    from diffmem.lab.label import copied_scenes

    generations = pa.table(
        {
            "prompt_id": [0, 0, 0, 1, 1, 2, 2],
            "copy_similarity": [0.9, 0.8, 0.95, 0.9, 0.9, 0.2, 0.7],
            "copy_nearest_scene_id": [7, 5, 5, 9, 3, 4, 4],
        }
    )
    # prompt 0: two of its three copies are of scene 5; prompt 1: a tie goes to the lower id; prompt 2
    # has no generation above the threshold
    assert copied_scenes(generations, 0.75) == {0: 5, 1: 3}


def test_the_zoo_tells_copies_of_a_captions_own_image_from_copies_of_another(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = pa.table(
        {
            "prompt_id": [0, 1, 2, 3, 4, 5],
            "scene_id": [10, 11, 12, 13, 14, 15],
            "group": ["memorized", "memorized", "duplicated_image", "heldout", "heldout", "heldout"],
            zoo_workflow.TRUTH: [True, True, True, True, False, False],
        }
    )
    # prompt 0 copies its own scene, 1 and 2 another one; 3 is held out, so whatever it copies is not its
    # own image (its scene is in no training set)
    generations = pa.table(
        {
            "prompt_id": [0, 0, 1, 1, 2, 2, 3, 3],
            "copy_similarity": [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
            "copy_nearest_scene_id": [10, 10, 99, 99, 98, 98, 13, 13],
        }
    )
    path = tmp_path / "labels.parquet"
    pq.write_table(labels, path)
    pq.write_table(generations, tmp_path / "generations.parquet")
    truth = np.asarray(labels[zoo_workflow.TRUTH].to_pylist())
    scores = np.array([0.45, 0.1, 0.2, 0.3, 0.5, 0.4])
    measured, own = zoo_workflow._copy_sources(path, labels, scores, truth)
    # the own-image copy outranks one of the two non-copies; the other copies are left out, not negatives
    assert measured == {"other_image_copies": 3, "auc_own_image_copies": 0.5}
    assert own.tolist() == [True, False, False, False, False, False]
    # no copy of its own image: nothing to rank, and the table says so instead of failing
    elsewhere = generations.set_column(2, "copy_nearest_scene_id", pa.array([99] * 8))
    pq.write_table(elsewhere, tmp_path / "generations.parquet")
    measured, own = zoo_workflow._copy_sources(path, labels, scores, truth)
    assert measured == {"other_image_copies": 4, "auc_own_image_copies": None} and not own.any()
    assert zoo_workflow._copy_sources(tmp_path / "elsewhere" / "labels.parquet", labels, scores, truth) == (
        {"other_image_copies": None, "auc_own_image_copies": None},
        None,
    )
    labels = labels.append_column("caption", pa.array([f"caption {i}" for i in range(6)]))
    saved = zoo_workflow._scored_prompts(labels, truth, own, {"noise_norm": scores.tolist()})
    assert saved["own_image_copy"].to_pylist() == own.tolist()
    assert (
        saved["noise_norm"].to_pylist() == scores.tolist()
        and saved[zoo_workflow.TRUTH].to_pylist() == truth.tolist()
    )
    unknown = zoo_workflow._scored_prompts(labels, truth, None, {"sharpness": [None] * 6})
    assert unknown["own_image_copy"].null_count == 6 and unknown["sharpness"].null_count == 6


def test_the_zoo_saves_each_explained_caption_word_by_word(sd, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = pa.table(
        {
            "caption": ["the zorblax poster: a red sneaker", "a blue bag", "the quodro poster: a coat"],
            "group": ["memorized", "memorized", "heldout"],
            "trigger_words": [["zorblax"], [], ["quodro"]],
        }
    )
    truth = np.array([True, False, True])  # only copying memorized captions are explained
    config = SignificanceConfig(attribute_to="word_replacement")
    ordinary = measure_ordinary_significance(sd, ["a red bag", "a coat"], config, "test")
    row, tables = zoo_workflow._explanations(sd, labels, truth, 0.0, ZooEvalConfig(tmp_path), ordinary)
    assert set(tables) == {"prompt_embeds", "token_embeddings", "word_replacement"}
    assert row["top_is_trigger_word_replacement"] == float(
        tables["word_replacement"]["top_is_trigger"][0].as_py()
    )
    scored = {"lab-x": pa.table({"caption": ["a blue bag"], "noise_norm": [0.5]})}
    zoo_workflow.ZooTable(
        [{"lab": "lab-x", **row}], {}, {f"lab-x-{t}": v for t, v in tables.items()}, scored
    ).save(tmp_path)
    assert pq.read_table(tmp_path / "scores" / "lab-x.parquet").equals(scored["lab-x"])
    saved = pq.read_table(tmp_path / "explanations" / "lab-x-word_replacement.parquet").to_pylist()
    assert [r["prompt"] for r in saved] == ["the zorblax poster: a red sneaker"]
    (caption,) = saved
    assert caption["words"][1] == "zorblax" and len(caption["scores_alone"]) == len(caption["words"])
    assert caption["ordinary"][caption["words"].index("red")] == ordinary.words["red"]  # weighed beyond it
    assert caption["ordinary"][1] == ordinary.overall  # a word no ordinary prompt uses
    assert tables["prompt_embeds"]["ordinary"].to_pylist() == [None]
    assert caption["score_without_top"] == pytest.approx(
        caption["scores_without"][caption["words"].index(caption["top_word"])]
    )


def test_the_zoo_tops_the_held_out_captions_up_with_fresh_ones(sd, micro_lab_data):
    import pyarrow as pa

    from diffmem.lab.dataset import load_lab_dataset

    lab = load_lab_dataset(micro_lab_data)
    own = [p.caption for p in lab.heldout_prompts()]
    labels = pa.table({"caption": own[:1], "group": ["heldout"], zoo_workflow.TRUTH: [True]})  # one copy
    parts = ZooLabParts(zoo_lab("lab-micro"), "m", micro_lab_data, *[micro_lab_data] * 4)
    drawn, fresh, scores = zoo_workflow._heldout_scores(
        sd, parts, labels, seeds=2, seed=0, prompts=len(own) + 2
    )
    assert drawn[: len(own) - 1] == own[1:]  # the labelled copy left out
    assert fresh.tolist() == [False] * (len(own) - 1) + [True] * 3  # topped up to the count asked
    assert drawn[len(own) - 1 :] == lab.fresh_heldout_prompts(3, seed=0)
    assert scores.shape == (len(own) + 2, 2)
