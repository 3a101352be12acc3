"""Token significance (SPEC §2): gradients of the noise norm w.r.t. token embeddings, mapped to words."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.errors import DiffmemError
from diffmem.explain import SignificanceConfig, token_significance, word_attention_maps
from diffmem.explain.attention_maps import WordAttention
from diffmem.explain.carrying_words import MAX_CARRYING_WORDS, carrying_words
from diffmem.explain.evaluate import trigger_evaluation
from diffmem.explain.token_significance import _token_embedding_leaves
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d
from diffmem.report.explanation_page import explanation_page
from diffmem.sampling import generation_seed
from diffmem.sampling.guided_sampler import eps_scheduler
from diffmem.sampling.seeds import initial_noise, seeded_generators

CONFIG = SignificanceConfig(num_inference_steps=5)
PROMPT = "A Zorblax-vase  at the top-left!"


@pytest.mark.supports("explanation", "stable-diffusion")
def test_token_scores_are_the_gradient_norms_of_the_first_step_noise_norm(sd):
    result = token_significance(sd, PROMPT, CONFIG, prompt_id=3)
    schedule = eps_scheduler(sd.scheduler)
    schedule.set_timesteps(5)
    t = schedule.timesteps[0]
    x_T = torch.randn(
        (1, *sd.sample_shape), generator=torch.Generator().manual_seed(generation_seed(0, 3, 0))
    )
    cond = sd.encode([PROMPT])
    embeds = cond["prompt_embeds"].clone().requires_grad_(True)
    d = sd.eps(x_T, t, cond.replace(prompt_embeds=embeds)) - sd.eps(x_T, t, sd.null_condition(1))
    norm = (d - d.mean(dim=(2, 3), keepdim=True)).norm()  # the noise norm's centred difference
    (gradient,) = torch.autograd.grad(norm, embeds)
    per_position = gradient[0].norm(dim=-1)
    count = len(result.tokens)
    torch.testing.assert_close(
        torch.tensor(result.token_scores), per_position[1 : count + 1], rtol=1e-4, atol=1e-7
    )
    assert result.score == pytest.approx(float(norm.detach()), rel=1e-5)


def test_bpe_pieces_merge_into_words_with_character_spans(sd):
    result = token_significance(sd, PROMPT, CONFIG)
    assert result.tokens[:4] == ["a", "zor", "bla", "x"]
    assert result.words == ["A", "Zorblax", "-", "vase", "at", "the", "top", "-", "left", "!"]
    assert [PROMPT[s:e] for s, e in result.word_spans] == result.words
    pieces = [v for v, w in zip(result.token_scores, result.token_words) if w == 1]
    assert len(pieces) == 3 and result.word_scores[1] == pytest.approx(sum(v * v for v in pieces) ** 0.5)
    assert sum(result.normalized) == pytest.approx(1.0)
    assert result.to_table().column("word").to_pylist() == result.words
    words = [i for i, w in enumerate(result.words) if w.isalnum()]
    assert result.ranking()[0] == max(words, key=lambda i: result.word_scores[i])


def test_punctuation_marks_rank_after_every_word_and_are_not_replaced(sd):
    result = token_significance(sd, PROMPT, CONFIG)
    marks = [i for i, w in enumerate(result.words) if not w.isalnum()]
    loud = dataclasses.replace(result, word_scores=[9.0 if i in marks else 1.0 + i for i in range(10)])
    assert loud.ranking() == [8, 6, 5, 4, 3, 1, 0, *marks]  # words by score, then the marks by theirs
    replaced = token_significance(sd, PROMPT, dataclasses.replace(CONFIG, attribute_to="word_replacement"))
    assert [replaced.word_scores[i] for i in marks] == [0.0] * len(marks)
    assert replaced.words == result.words


def test_word_replacement_adds_what_a_word_takes_away_to_what_it_scores_alone(sd):
    from diffmem.detect.noise_norm import noise_norm
    from diffmem.explain.token_significance import REPLACEMENT

    config = dataclasses.replace(CONFIG, attribute_to="word_replacement")
    result = token_significance(sd, "a zorblax vase, red", config, prompt_id=3)
    words = [i for i, w in enumerate(result.words) if w.isalnum()]
    edits = [result.replaced(i, REPLACEMENT) for i in words] + [result.words[i] for i in words]
    measured = noise_norm(sd, edits, config.noise_norm_config(), prompt_ids=[3] * len(edits)).scores
    for k, i in enumerate(words):  # the same seeds as the prompt's own score
        expected = max(result.score - float(measured[k]) + float(measured[len(words) + k]), 0.0)
        assert result.word_scores[i] == pytest.approx(expected, rel=1e-5)
        assert result.scores_without[i] == pytest.approx(float(measured[k]), rel=1e-5)
        assert result.scores_alone[i] == pytest.approx(float(measured[len(words) + k]), rel=1e-5)
    comma = result.words.index(",")
    assert result.word_scores[comma] == 0.0 and result.scores_without[comma] is None
    table = result.to_table()
    assert table["score_without"].to_pylist() == result.scores_without
    assert table["score_alone"].to_pylist() == result.scores_alone
    assert (
        "score_without" not in token_significance(sd, "a zorblax vase, red", CONFIG).to_table().column_names
    )


def test_a_word_whose_replacement_alone_unflags_the_prompt_ranks_first(sd):
    config = dataclasses.replace(CONFIG, attribute_to="word_replacement")
    result = token_significance(sd, "a zorblax vase, red", config)
    assert result.words == ["a", "zorblax", "vase", ",", "red"]
    measured = dataclasses.replace(
        result,
        score=1.0,
        word_scores=[0.1, 0.9, 0.5, 0.0, 0.3],  # zorblax is the most significant word
        scores_without=[0.95, 0.9, 0.6, None, 0.7],  # but only replacing vase or red takes it to 0.75
    )
    assert measured.ranking() == [1, 2, 4, 0, 3] == measured.ranking(threshold=0.5)  # none unflags it
    assert measured.ranking(threshold=0.75) == [2, 4, 1, 0, 3]  # the unflagging words first, by significance
    assert measured.unflags(4, 0.75) and not measured.unflags(1, 0.75) and not measured.unflags(3, 0.75)
    assert measured.ranking(threshold=1.0) == measured.ranking()  # not flagged: nothing to unflag
    gradient = token_significance(sd, "a zorblax vase, red", CONFIG)
    assert gradient.ranking(threshold=0.0) == gradient.ranking()  # no replacement measured
    # the page's words table follows the threshold it is given: vase first, not zorblax
    attention = WordAttention(result.words, torch.rand(5, 4, 4), step=0)
    images = torch.rand(1, 3, 8, 8)
    first_row = re.compile(r"<th>Share</th></tr>\s*<tr><td>([^<]+)</td>")
    ranked = explanation_page(measured, attention, images, {}, threshold=0.75)
    assert first_row.search(ranked).group(1) == "vase"
    assert first_row.search(explanation_page(measured, attention, images, {})).group(1) == "zorblax"


def test_long_prompts_are_explained_as_the_model_reads_them(sd, tmp_path):
    result = token_significance(sd, "red sneaker " * 50, CONFIG)
    assert result.truncated and len(result.tokens) == 75 and len(result.words) == 75
    assert result.plot(tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input(sd):
    with pytest.raises(DiffmemError, match="the prompt is empty"):
        token_significance(sd, "  ", CONFIG)
    with pytest.raises(DiffmemError, match="needs classifier-free guidance"):
        token_significance(sd, PROMPT, SignificanceConfig(guidance_scale=1.0))
    with pytest.raises(DiffmemError, match="needs a text-conditioned model"):
        token_significance(wrap_pipeline(tiny_unet2d()), PROMPT, CONFIG)


def test_trigger_evaluation_rows(sd):
    prompts = ["the zorblax poster: a red sneaker at the top left", "a blue bag on a gray background"]
    table = trigger_evaluation(sd, prompts, [["zorblax"], []], threshold=0.0, config=CONFIG).to_pylist()
    assert [r["prompt"] for r in table] == prompts
    for row in table:
        assert row["top_is_trigger"] == (
            row["top_word"].lower() in (["zorblax"] if "zorblax" in row["prompt"] else [])
        )
        assert row["random_word"].lower() != "zorblax" and row["flagged"] == (row["score"] > 0.0)
        assert row["below_without_top"] == (row["score_without_top"] <= 0.0)
        assert len(row["words"]) == len(row["significance"]) and row["scores_without"] is None


def test_the_carrying_words_are_found_one_greedy_replacement_at_a_time(sd):
    from diffmem.detect.noise_norm import noise_norm

    explained = token_significance(sd, PROMPT, CONFIG)
    assert explained.replaced([1, 3], "object") == "A object-object  at the top-left!"
    measure = CONFIG.noise_norm_config()
    searched = carrying_words(sd, explained, -1.0, measure)  # nothing takes it under -1
    assert not searched.found and len(searched.scores) == MAX_CARRYING_WORDS
    words = [i for i, w in enumerate(explained.words) if w.isalnum()]  # punctuation is never replaced
    edits = [explained.replaced(i, "object") for i in words]
    alone = noise_norm(sd, edits, measure, prompt_ids=[0] * len(edits)).scores.tolist()  # the same seed
    assert searched.scores[0] == pytest.approx(min(alone))  # first: the word whose replacement lowers it most
    threshold = searched.scores[1]  # under once the first two chosen words are replaced
    found = carrying_words(sd, explained, threshold, measure)
    assert found.found and found.scores == pytest.approx(searched.scores[: len(found.words)])
    assert len(found.words) == (1 if searched.scores[0] <= threshold else 2)
    assert all(explained.words[i].isalnum() for i in found.words)


def test_trigger_evaluation_names_the_carrying_words_of_flagged_prompts_only(sd):
    prompts = ["the zorblax poster: a red sneaker at the top left"]
    explained = token_significance(sd, prompts[0], CONFIG)
    (row,) = trigger_evaluation(sd, prompts, [["zorblax"]], -1.0, CONFIG).to_pylist()
    assert row["flagged"] and row["carrying_words"] == [] and row["below_without_carrying"] is False
    assert row["carrying_are_triggers"] is False and row["below_without_random_as_many"] is False
    (row,) = trigger_evaluation(sd, prompts, [["zorblax"]], explained.score + 1, CONFIG).to_pylist()
    assert not row["flagged"] and row["carrying_words"] is None and row["below_without_carrying"] is None


def test_explain_command_saves_the_words_and_says_where_the_score_stands(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from diffmem.cli.main import run

    out = tmp_path / "e"
    assert run(["explain", "the fennev vykex poster: a purple shirt", "--out", str(out)]) == 0
    summary = json.loads((out / "explanation.json").read_text())
    assert summary["words"] == pq.read_table(out / "significance.parquet").column("word").to_pylist()
    assert summary["words"][:3] == ["the", "fennev", "vykex"] and summary["threshold"] is not None
    assert summary["flagged"] == (summary["score"] > summary["threshold"])
    assert "noise-norm score" in capsys.readouterr().out and (out / "significance.png").is_file()
    assert (
        run(["explain", "a red bag", "--model", "builtin:tiny-sd", "--out", str(out), "--first-steps", "2"])
        == 0
    )
    assert json.loads((out / "explanation.json").read_text())["threshold"] is None
    by_input = tmp_path / "by-input"
    command = ["explain", "the fennev vykex poster: a purple shirt", "--attribute-to", "token_embeddings"]
    assert run([*command, "--out", str(by_input)]) == 0
    inputs = json.loads((by_input / "explanation.json").read_text())
    assert inputs["config"]["attribute_to"] == "token_embeddings" and inputs["score"] == summary["score"]
    assert inputs["normalized"] != summary["normalized"] and inputs["threshold"] == summary["threshold"]
    assert run([*command[:3], "pixels", "--out", str(by_input)]) == 2
    assert "unknown attribution target 'pixels'" in capsys.readouterr().err
    assert "carrying_words" not in summary  # not flagged: nothing to take under
    assert run(["explain", "the quinlojaf nevprapim poster: a shirt", "--out", str(out)]) == 0  # memorized
    flagged = json.loads((out / "explanation.json").read_text())
    assert flagged["flagged"] and flagged["carrying_words"] == ["quinlojaf"]  # its title's first word
    assert flagged["scores_after_replacing"][0] <= flagged["threshold"] < flagged["score"]
    assert "replacing 'quinlojaf' takes it under the threshold" in capsys.readouterr().out


def test_the_verdict_names_the_carrying_words_or_how_low_replacing_words_got(sd):
    from diffmem.cli.explain import verdict
    from diffmem.workflows.explain import ExplanationRun

    explained = token_significance(sd, PROMPT, CONFIG)
    flagged = {"flagged": True, "carrying_words": ["Zorblax"], "scores_after_replacing": [0.5]}
    lines = verdict(
        ExplanationRun(explained, flagged, explained.score - 1, None), "word_replacement", Path("o")
    )
    assert (
        lines[0].endswith("word significance by word_replacement; wrote o")
        and "above the threshold" in lines[0]
    )
    assert lines[1] == "replacing 'Zorblax' takes it under the threshold"
    held = {"flagged": True, "carrying_words": [], "scores_after_replacing": [3.0, 2.5, 2.75]}
    lines = verdict(ExplanationRun(explained, held, 1.0, None), "word_replacement", Path("o"))
    assert lines[1].startswith("replacing up to 3 of its words leaves it flagged (at best 2.500)")
    wordless = {"flagged": True, "carrying_words": [], "scores_after_replacing": []}  # e.g. "!!!"
    lines = verdict(ExplanationRun(explained, wordless, 1.0, None), "word_replacement", Path("o"))
    assert lines[1] == "it has no words to replace"
    unflagged = verdict(
        ExplanationRun(explained, {"flagged": False}, None, None), "token_embeddings", Path("o")
    )
    assert len(unflagged) == 1 and "threshold" not in unflagged[0]


def test_word_attention_maps_share_each_positions_attention_among_the_words(sd):
    processors = dict(sd.network.attn_processors)
    first = word_attention_maps(sd, PROMPT, 0, CONFIG)
    assert first.words == token_significance(sd, PROMPT, CONFIG).words
    assert first.maps.shape == (10, *sd.sample_shape[1:]) and (first.maps >= 0).all()
    assert (first.maps.sum(dim=0) <= 1 + 1e-5).all()  # start, end and padding tokens take the rest
    assert sd.network.attn_processors.keys() == processors.keys()
    assert all(type(p) is type(processors[k]) for k, p in sd.network.attn_processors.items())
    later = word_attention_maps(
        sd, "a red bag", 2, SignificanceConfig(num_inference_steps=5, n_generations=2)
    )
    assert later.step == 2 and later.maps.shape[0] == 3


def test_uniform_attention_gives_each_word_its_share_of_the_77_positions():
    uniform = wrap_pipeline(tiny_stable_diffusion())
    with torch.no_grad():
        for name, module in uniform.network.named_modules():
            if name.endswith("attn2"):  # cross-attention: equal logits for every token
                module.to_k.weight.zero_()
    result = word_attention_maps(uniform, PROMPT, 0, CONFIG)
    pieces_per_word = torch.bincount(torch.tensor(token_significance(uniform, PROMPT, CONFIG).token_words))
    expected = (pieces_per_word / 77.0)[:, None, None].expand_as(result.maps)
    torch.testing.assert_close(result.maps, expected, rtol=1e-5, atol=1e-6)


def test_explain_html_page_is_self_contained_and_escaped(tmp_path):
    from diffmem.cli.main import run

    page = tmp_path / "page.html"
    args = ["explain", "a <b>red</b> bag", "--model", "builtin:tiny-sd", "--out", str(tmp_path / "e")]
    assert run([*args, "--html", str(page), "--n-generations", "2", "--num-inference-steps", "4"]) == 0
    text = page.read_text()
    assert "<b>red</b>" not in text and "&lt;b&gt;red&lt;/b&gt;" in text
    words = token_significance(
        wrap_pipeline(tiny_stable_diffusion()), "a <b>red</b> bag", SignificanceConfig(num_inference_steps=4)
    ).words
    assert text.count("<span style='background:rgba(220,0,0,") == len(words)
    # 2 generated images, then one attention overlay per word (up to 6)
    assert text.count("data:image/png;base64,") == 2 + min(6, len(words))
    assert "http" not in text.replace("http-equiv", "")  # nothing loaded from elsewhere


def test_token_embedding_scores_are_the_gradient_at_the_text_encoders_input():
    """Central differences of the first-step noise norm along every direction of one token's input
    embedding (float64) give the gradient whose norm ``attribute_to="token_embeddings"`` reports."""
    sd64 = wrap_pipeline(tiny_stable_diffusion().to(torch.float64))
    config = SignificanceConfig(num_inference_steps=5, attribute_to="token_embeddings")
    result = token_significance(sd64, PROMPT, config, prompt_id=3)
    schedule = eps_scheduler(sd64.scheduler)
    schedule.set_timesteps(5)
    t = schedule.timesteps[0]
    x_T = initial_noise(
        seeded_generators([generation_seed(0, 3, 0)]), sd64.sample_shape, sd64.device, torch.float64
    )
    null = sd64.eps(x_T, t, sd64.null_condition(1))
    embedding = sd64.pipeline.text_encoder.get_input_embeddings()
    position = 1 + result.token_words.index(3)  # "vase": one BPE piece, after the start token

    def norm_with(offset: torch.Tensor) -> float:
        def shifted(module, inputs, output):
            output = output.clone()
            output[:, position] += offset
            return output

        handle = embedding.register_forward_hook(shifted)
        try:
            cond = sd64.encode([PROMPT])
        finally:
            handle.remove()
        d = sd64.eps(x_T, t, cond) - null
        return float((d - d.mean(dim=(2, 3), keepdim=True)).norm().detach())

    width, h = embedding.embedding_dim, 1e-5
    basis = torch.eye(width, dtype=torch.float64)
    gradient = torch.tensor([(norm_with(h * e) - norm_with(-h * e)) / (2 * h) for e in basis])
    assert result.word_scores[3] == pytest.approx(float(gradient.norm()), rel=1e-4)
    assert result.score == pytest.approx(norm_with(torch.zeros(width, dtype=torch.float64)), rel=1e-6)
    wen = token_significance(sd64, PROMPT, SignificanceConfig(num_inference_steps=5), prompt_id=3)
    assert wen.score == pytest.approx(result.score) and wen.word_scores != pytest.approx(result.word_scores)


@pytest.mark.supports("explanation", "stable-diffusion-xl")
def test_token_embedding_attribution_reaches_both_sdxl_encoders():
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    with _token_embedding_leaves(sdxl.text_encoders) as leaves:
        cond = sdxl.encode([PROMPT], differentiable=True)
    assert len(leaves) == 2 and all(leaf.requires_grad for leaf in leaves)
    for name in ("prompt_embeds", "text_embeds"):  # the pooled embedding comes from the second encoder
        gradients = torch.autograd.grad(cond[name].sum(), leaves, allow_unused=True, retain_graph=True)
        assert gradients[1] is not None and gradients[1].abs().sum() > 0
    config = SignificanceConfig(num_inference_steps=5, n_generations=2, attribute_to="token_embeddings")
    result = token_significance(sdxl, PROMPT, config)
    wen = token_significance(sdxl, PROMPT, SignificanceConfig(num_inference_steps=5, n_generations=2))
    assert len(result.word_scores) == 10 and all(s > 0 for s in result.word_scores)
    assert result.score == pytest.approx(wen.score) and result.word_scores != pytest.approx(wen.word_scores)
    with pytest.raises(DiffmemError, match="attribution target"):
        SignificanceConfig(attribute_to="pixels")


def test_token_embedding_attribution_over_several_steps_reuses_the_encoders_graph(sd):
    """Every step differentiates through the one text-encoder graph the prompt was encoded with."""
    config = SignificanceConfig(num_inference_steps=5, steps=3, attribute_to="token_embeddings")
    result = token_significance(sd, PROMPT, config)
    first = token_significance(
        sd, PROMPT, SignificanceConfig(num_inference_steps=5, attribute_to="token_embeddings")
    )
    assert all(s > 0 for s in result.word_scores) and result.word_scores != pytest.approx(first.word_scores)
