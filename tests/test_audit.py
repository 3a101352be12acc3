"""``diffmem audit``: calibrate, scan, explain the flagged prompts, generate them plain and mitigated,
and one self-contained report (read back in a headless browser)."""

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from diffmem.cli.main import run
from diffmem.detect.calibration import Calibration
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.registry import config_settings
from diffmem.explain.carrying_words import MAX_CARRYING_WORDS
from diffmem.index import TrainingSetIndex
from diffmem.sampling import generate

PROMPTS = ["a red sneaker at the top left", "the zorblax vase poster", "a blue bag", "a green coat"]


@pytest.fixture(scope="module")
def audited(sd, tmp_path_factory):
    """An audit of the tiny pipeline against a pixel index holding its own generation of every prompt, with
    a calibration that flags the two highest-scoring prompts, mitigated by prompt optimisation."""
    folder = tmp_path_factory.mktemp("audit")
    own = generate(sd, PROMPTS, num_inference_steps=50).images
    noise = torch.rand((30, *own.shape[1:]), generator=torch.Generator().manual_seed(3))
    captions = PROMPTS + [f"filler {i}" for i in range(30)]
    TrainingSetIndex.build_pixels(torch.cat([own, noise]), captions).save(folder / "index")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    scores = sorted(noise_norm(sd, PROMPTS).scores.tolist())
    threshold = (scores[1] + scores[2]) / 2
    settings = config_settings(NoiseNormConfig())
    Calibration("noise_norm", settings, "builtin:tiny-sd", 0.01, threshold, 4, 0.5).save(folder / "c.json")
    args = ["audit", "--model", "builtin:tiny-sd", "--prompts", str(folder / "prompts.txt")]
    args += ["--index", str(folder / "index"), "--calibration", str(folder / "c.json")]
    args += ["--mitigation", "prompt_optimization:max_iterations=2", "--out", str(folder / "out")]
    assert run(args) == 0
    return folder / "out"


def test_the_audit_scores_every_prompt_and_examines_the_flagged_ones(audited):
    rows = pq.read_table(audited / "audit.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == PROMPTS
    flagged = [r for r in rows if r["flagged"]]
    assert len(flagged) == 2 and all(r["examined"] for r in flagged)
    assert all(r["top_word"] in r["prompt"].split() for r in flagged)
    assert all(set(r["carrying_words"]) <= set(r["prompt"].split()) for r in flagged)
    assert all(r["carrying_words"] is None for r in rows if not r["flagged"])
    threshold = json.loads((audited / "summary.json").read_text())["threshold"]
    # the search's scores: under the threshold at its last step exactly when it found words
    for row in flagged:
        after = row["scores_after_replacing"]
        assert after and (after[-1] <= threshold) == bool(row["carrying_words"])
        assert len(after) == (len(row["carrying_words"]) or MAX_CARRYING_WORDS)
    assert all(r["similarity_plain"] is not None and r["similarity_mitigated"] is not None for r in flagged)
    summary = json.loads((audited / "summary.json").read_text())
    # both unflagged prompts are drawn and generated at the seed they were scored with: each image is the
    # index's copy of it, which the score does not flag
    unflagged = [r for r in rows if not r["flagged"]]
    assert all(r["unflagged_checked"] and r["similarity_mitigated"] is None for r in unflagged)
    assert all(r["similarity_plain"] < summary["copy_threshold"] for r in unflagged)
    assert not any(r["unflagged_checked"] for r in flagged)
    assert summary["unflagged_checked"] == 2 and summary["copies_unflagged"] == 2
    assert (
        summary["flagged"] == 2
        and summary["measure"] == "nl2"
        and summary["explanation"] == "word_replacement"
    )
    copies = sum(r["similarity_plain"] < summary["copy_threshold"] for r in flagged)
    assert summary["copies_plain"] == copies
    assert (
        summary["mitigation"] == "prompt_optimization"
        and summary["mitigation_settings"]["max_iterations"] == 2
    )
    assert summary["mitigation_settings"]["target"] > 0  # the model's calibrated target, not given
    assert summary["mitigation_settings"]["gate"].endswith(".json")  # copies confirmed against the index


def test_the_report_shows_each_flagged_prompt_beside_its_nearest_training_image(audited, browser):
    from selenium.webdriver.common.by import By

    browser.get((audited / "report.html").as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == "Memorization audit of builtin:tiny-sd"
    captions = [c.text for c in browser.find_elements(By.TAG_NAME, "figcaption")]
    examined = ["plain", "nearest training image", "prompt_optimization"] * 2
    assert captions == examined + ["plain", "nearest training image"] * 2  # then the unflagged copies
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 1 + 6 + 4 and all(
        browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images
    )
    flagged = [r["prompt"] for r in pq.read_table(audited / "audit.parquet").to_pylist() if r["flagged"]]
    heat = browser.find_elements(By.CSS_SELECTOR, "p span[style*='background']")
    assert sorted(s.text for s in heat) == sorted(w for prompt in flagged for w in prompt.split())
    body = browser.find_element(By.TAG_NAME, "body").text
    assert body.count("takes it under the threshold") + body.count("leaves it flagged") == 2
    assert "Unflagged prompts that copy (2 of 2 drawn at random)" in body
    assert "2 generate a copy the score does not flag" in body


def test_the_audit_refuses_an_earlier_run_and_a_bad_calibration_before_any_work(audited, tmp_path, capsys):
    args = ["audit", "--model", "builtin:tiny-sd", "--prompts", str(audited.parent / "prompts.txt")]
    assert run([*args, "--out", str(audited)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert run([*args, "--calibration", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert run([*args, "--unflagged-checked", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "unflagged_checked" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_each_examined_image_is_the_generation_whose_first_step_was_scored(audited, sd, tmp_path):
    from diffmem.workflows.audit import AuditConfig, audit

    scores = noise_norm(sd, PROMPTS).scores.tolist()
    rising = [PROMPTS[i] for i in sorted(range(len(PROMPTS)), key=lambda i: scores[i])]
    (tmp_path / "rising.txt").write_text("\n".join(rising))  # examined highest first: ids 3, 2, ...
    settings = config_settings(NoiseNormConfig())
    Calibration("noise_norm", settings, "builtin:tiny-sd", 0.01, min(scores) - 1, 4, 1.0).save(
        tmp_path / "c.json"
    )
    config = AuditConfig(
        "builtin:tiny-sd", tmp_path / "rising.txt", index=audited.parent / "index",
        calibration=tmp_path / "c.json", mitigation="prompt_optimization:max_iterations=1", max_flagged=2,
    )  # fmt: skip
    result = audit(config)
    examined = [r["prompt_id"] for r in result.table.to_pylist() if r["examined"]]
    assert sorted(examined) == [2, 3]
    plain = generate(sd, [rising[i] for i in (3, 2)], prompt_ids=[3, 2], num_inference_steps=50).images
    assert torch.allclose(result.images["plain"], plain, atol=1e-5)


def test_without_a_calibration_the_audit_flags_by_the_profile_against_its_index(audited, tmp_path):
    from diffmem.models.source import ModelSource
    from diffmem.workflows.audit import AuditConfig, audit
    from diffmem.workflows.calibrate import model_profile
    from diffmem.workflows.runtime import Runtime

    config = AuditConfig(
        "builtin:tiny-sd", audited.parent / "prompts.txt", index=audited.parent / "index",
        mitigation="prompt_optimization:max_iterations=1", max_flagged=1, unflagged_checked=0,
    )  # fmt: skip
    result = audit(config)
    source = ModelSource.resolve("builtin:tiny-sd")
    against_index = model_profile(source, Runtime(), index=audited.parent / "index")  # cached by the audit
    assert against_index.reference == "index captions"
    assert result.summary["threshold"] == pytest.approx(against_index.detection_threshold)
    assert result.summary["threshold"] != pytest.approx(model_profile(source, Runtime()).detection_threshold)


def test_the_audit_reads_an_embedding_index_s_nearest_images_from_its_training_set(audited, sd, tmp_path):
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from diffmem.errors import DiffmemError
    from diffmem.index import image_source, index_images
    from diffmem.metrics import CopyDetectionConfig, CopyDetectionEncoder, save_encoder
    from diffmem.workflows.audit import AuditConfig, audit

    own = generate(sd, PROMPTS, num_inference_steps=50).images
    noise = torch.rand((6, *own.shape[1:]), generator=torch.Generator().manual_seed(4))
    arrays = [np.rint(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in torch.cat([own, noise])]
    captions = PROMPTS + [f"filler {i}" for i in range(6)]
    (tmp_path / "data").mkdir()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / "data" / f"{i}.png")
    names = [f"{i}.png" for i in range(len(arrays))]
    pq.write_table(
        pa.table({"file_name": names, "caption": captions}), tmp_path / "data" / "metadata.parquet"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CopyDetectionEncoder(CopyDetectionConfig(input_size=own.shape[-1])).eval()
    save_encoder(encoder, tmp_path / "encoder")
    index_images(image_source(tmp_path / "data"), "embedding", tmp_path / "encoder").save(tmp_path / "index")

    config = AuditConfig(
        "builtin:tiny-sd", audited.parent / "prompts.txt", index=tmp_path / "index",
        calibration=audited.parent / "c.json", mitigation="prompt_optimization:max_iterations=1",
        max_flagged=2, unflagged_checked=0, data=tmp_path / "data",
    )  # fmt: skip
    copies = audit(config).copies
    written = dict(zip(captions, arrays, strict=True))
    for key in ("plain", "mitigated"):
        for image, caption in zip(copies.nearest[key], copies.captions[key], strict=True):
            expected = torch.from_numpy(written[caption]).permute(2, 0, 1).float() / 255
            assert torch.equal(image, expected)  # the training image of the nearest row
    (tmp_path / "other").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "other" / "0.png")
    pq.write_table(
        pa.table({"file_name": ["0.png"], "caption": ["one"]}), tmp_path / "other" / "metadata.parquet"
    )
    with pytest.raises(DiffmemError, match="not the training set the index was built from"):
        audit(replace(config, data=tmp_path / "other"))
    with pytest.raises(DiffmemError, match="give that --index"):
        audit(replace(config, index=audited.parent / "index"))  # a pixel index holds its images
