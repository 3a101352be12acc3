"""Word replacement weighs each word beyond its significance in ordinary prompts."""

import dataclasses
import json

import pytest

from diffmem.errors import DiffmemError
from diffmem.explain import SignificanceConfig, token_significance
from diffmem.explain.ordinary_significance import OrdinarySignificance, measure_ordinary_significance
from diffmem.models.source import ModelSource
from diffmem.workflows import ordinary_significance as workflow
from diffmem.workflows.calibrate import ProfileConfig, calibrate_model

CONFIG = SignificanceConfig(num_inference_steps=5, attribute_to="word_replacement")
SETTINGS = {k: v for k, v in dataclasses.asdict(CONFIG).items() if k != "base_seed"}


def test_each_word_is_weighed_beyond_its_ordinary_significance(sd):
    plain = token_significance(sd, "a zorblax vase, red", CONFIG, prompt_id=2)
    ordinary = OrdinarySignificance(
        {"red": 1e6, "vase": 0.0}, overall=1e-4, prompts=3, origin="t", settings=SETTINGS
    )
    against = token_significance(sd, "a zorblax vase, red", CONFIG, prompt_id=2, ordinary=ordinary)
    assert against.words == plain.words and against.score == plain.score
    assert against.ordinary == [1e-4, 1e-4, 0.0, None, 1e6]  # unseen words weigh as the average word
    expected = [max(s - (o or 0.0), 0.0) for s, o in zip(plain.word_scores, against.ordinary)]
    assert against.word_scores == pytest.approx(expected)
    assert against.word_scores[4] == 0.0 < plain.word_scores[4]  # "red" matters as much everywhere
    assert against.scores_without == plain.scores_without  # what replacing a word does is unchanged
    assert against.to_table()["ordinary"].to_pylist() == against.ordinary
    assert "ordinary" not in plain.to_table().column_names


def test_ordinary_significance_is_each_words_mean_over_the_prompts(sd):
    prompts = ["a red vase", "a red cup"]
    measured = measure_ordinary_significance(sd, prompts, CONFIG, origin="test")
    first, second = (token_significance(sd, p, CONFIG, prompt_id=i) for i, p in enumerate(prompts))
    assert measured.words["red"] == pytest.approx((first.word_scores[1] + second.word_scores[1]) / 2)
    assert measured.words["vase"] == pytest.approx(first.word_scores[2])
    every = first.word_scores + second.word_scores
    assert measured.overall == pytest.approx(sum(every) / len(every))
    assert measured.of("RED") == measured.words["red"] and measured.of("zorblax") == measured.overall
    assert measured.prompts == 2 and "base_seed" not in measured.settings


def test_bad_input(sd, tmp_path):
    measured = OrdinarySignificance({"red": 0.1}, overall=0.1, prompts=1, origin="t", settings=SETTINGS)
    with pytest.raises(DiffmemError, match="measured with other settings \\(num_inference_steps\\)"):
        token_significance(
            sd, "a red vase", dataclasses.replace(CONFIG, num_inference_steps=6), ordinary=measured
        )
    with pytest.raises(DiffmemError, match="by word replacement only"):
        token_significance(
            sd, "a red vase", dataclasses.replace(CONFIG, attribute_to="prompt_embeds"), ordinary=measured
        )
    with pytest.raises(DiffmemError, match="measured by word replacement"):
        measure_ordinary_significance(
            sd, ["a red vase"], dataclasses.replace(CONFIG, attribute_to="prompt_embeds"), "t"
        )
    with pytest.raises(DiffmemError, match="at least one prompt"):
        measure_ordinary_significance(sd, [], CONFIG, "t")
    path = tmp_path / "o.json"
    path.write_text(json.dumps({**dataclasses.asdict(measured), "format": "something else"}))
    with pytest.raises(DiffmemError, match="not an ordinary-significance record"):
        OrdinarySignificance.load(path)


def test_measured_once_per_model_and_settings_then_read_from_the_cache(tmp_path, monkeypatch):
    source = ModelSource.resolve("builtin:tiny-sd")
    first = workflow.ordinary_significance(source, CONFIG)
    assert first.origin == "neutral" and first.prompts == workflow.ORDINARY_PROMPTS
    saved = first
    first.save(tmp_path / "kept.json")
    assert OrdinarySignificance.load(tmp_path / "kept.json") == saved

    def measure_again(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(workflow, "measure_ordinary_significance", measure_again)
    assert workflow.ordinary_significance(source, dataclasses.replace(CONFIG, base_seed=4)) == first
    with pytest.raises(AssertionError, match="measured again"):  # other settings: measured anew
        workflow.ordinary_significance(source, dataclasses.replace(CONFIG, guidance_scale=3.0))
    monkeypatch.undo()
    prompts = tmp_path / "ordinary.txt"
    prompts.write_text("a red vase\na blue cup\n")
    given = workflow.ordinary_significance(source, CONFIG, prompts=prompts)  # the user's prompts replace it
    assert (
        given.origin == str(prompts)
        and given.prompts == 2
        and set(given.words) == {"a", "red", "vase", "blue", "cup"}
    )
    assert workflow.ordinary_significance(source, CONFIG) == given
    default = SignificanceConfig(attribute_to="word_replacement")  # what explain measures with
    monkeypatch.setattr(workflow, "measure_ordinary_significance", measure_again)
    calibrate_model(ProfileConfig(source.spec, reference_scores=16))  # its own prompts: left to explain
    monkeypatch.undo()
    calibrate_model(ProfileConfig(source.spec, prompts=prompts, reference_scores=16))  # a user's: measured
    assert workflow.ordinary_significance(source, default).origin == str(prompts)


def test_explain_says_what_it_weighed_words_against(tmp_path, capsys):
    from diffmem.cli.main import run

    prompt = "the quinlojaf nevprapim poster: a shirt"
    assert run(["explain", prompt, "--out", str(tmp_path / "against")]) == 0
    against = json.loads((tmp_path / "against" / "explanation.json").read_text())
    assert against["ordinary"] == {"prompts": workflow.ORDINARY_PROMPTS, "origin": "index captions"}
    assert "beyond each word's in 64 ordinary prompts (index captions)" in capsys.readouterr().out
    assert run(["explain", prompt, "--no-ordinary", "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "explanation.json").read_text())
    assert raw["ordinary"] is None and raw["score"] == against["score"]
    assert raw["normalized"] != against["normalized"]


def test_the_served_explainer_weighs_words_as_explain_does():
    from diffmem.workflows.explain import ExplainConfig, prompt_explainer
    from diffmem.workflows.runtime import Runtime

    source = ModelSource.resolve("builtin:lab-micro")
    weighed = prompt_explainer(source, ExplainConfig("", source.spec), Runtime(), thumbnails=False)
    raw = prompt_explainer(
        source, ExplainConfig("", source.spec, ordinary=False), Runtime(), thumbnails=False
    )
    try:
        assert weighed.info()["settings"]["ordinary_prompts"] == workflow.ORDINARY_PROMPTS
        assert raw.info()["settings"]["ordinary_prompts"] is None and raw.threshold == weighed.threshold
        prompt = "the vyvelnev prasul poster: an orange dress on a teal background"
        assert weighed.explain(prompt)["words"] != raw.explain(prompt)["words"]
    finally:
        weighed.close()
        raw.close()
