"""Mitigation from the command line and its evaluation: `diffmem generate --mitigation/--guard/--index`,
`diffmem eval mitigate`, and `evaluate_mitigations` on a tiny random-weight model."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from diffmem.cli.main import run
from diffmem.index import TrainingSetIndex
from diffmem.metrics.copy_detection import CopyDetectionEncoder, save_encoder
from diffmem.mitigate import ReferenceSet, SamplingOptions
from diffmem.mitigate.evaluate import Measure, Quality, evaluate_mitigations, results_markdown
from diffmem.sampling import generate

PROMPTS = ["a red sneaker at the top left", "the zorblax vase poster", "a blue bag", "a green coat"]


@pytest.fixture(scope="module")
def training_images(sd):
    own = generate(sd, PROMPTS[:2], num_inference_steps=3).images  # two prompts "memorized"
    return torch.cat([own, torch.rand((50, *own.shape[1:]), generator=torch.Generator().manual_seed(3))])


@pytest.fixture(scope="module")
def pixel_index(training_images, tmp_path_factory):
    directory = tmp_path_factory.mktemp("index") / "pixels"
    captions = [PROMPTS[0], PROMPTS[1]] + ["filler"] * 50
    TrainingSetIndex.build_pixels(training_images, captions).save(directory)
    return directory


@pytest.fixture(scope="module")
def embedding_index(training_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    encoder = CopyDetectionEncoder().eval()
    save_encoder(encoder, folder / "encoder")
    with torch.no_grad():
        vectors = encoder(training_images)
    TrainingSetIndex.build_embeddings(
        vectors, ["x"] * len(vectors), encoder=f"{(folder / 'encoder').resolve()} sha256=0"
    ).save(folder / "index")
    return folder


def test_generate_with_a_mitigation_writes_what_it_did_and_the_nearest_training_image(tmp_path, pixel_index):
    out = tmp_path / "gen"
    args = ["generate", *PROMPTS[:2], "--mitigation", "rna", "--steps", "3", "--n-generations", "2"]
    assert run([*args, "--index", str(pixel_index), "--out", str(out)]) == 0
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["method"] for r in rows] == ["rna"] * 4
    assert all(len(r["prompt_used"].split()) == len(r["prompt"].split()) + 1 for r in rows)
    assert all(r["nearest_training_id"] is not None and r["nl2"] >= 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["mitigation"] == "rna" and summary["results"]["mitigated"] == 4
    assert summary["results"]["changed"] == 4  # every prompt drawn with a random number added


def test_generate_guard_mitigates_only_prompts_above_the_calibrated_threshold(tmp_path, capsys):
    prompts = tmp_path / "safe.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    calibration = tmp_path / "calibration.json"
    common = ["--num-inference-steps", "3"]
    assert (
        run(
            [
                "calibrate",
                "--prompts",
                str(prompts),
                "--out",
                str(calibration),
                "--target-fpr",
                "0.3",
                *common,
            ]
        )
        == 0
    )
    threshold = json.loads(calibration.read_text())["threshold"]
    out = tmp_path / "guarded"
    args = ["generate", *PROMPTS, "--steps", "3", "--mitigation", "gni:std=0.5", "--guard"]
    assert run([*args, "--calibration", str(calibration), "--out", str(out)]) == 0
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"gni", "none"}
    assert all((r["method"] == "gni") == (r["guard_score"] > threshold) for r in rows)
    plain = tmp_path / "plain"
    assert run(["generate", *PROMPTS, "--steps", "3", "--out", str(plain)]) == 0
    for row in rows:
        same = (out / row["image"]).read_bytes() == (plain / row["image"]).read_bytes()
        assert same is (row["method"] == "none")


def test_generate_refuses_what_it_cannot_do(tmp_path, capsys, embedding_index):
    cases = [
        (["--mitigation", "amg"], "needs the training set: give an index"),
        (["--mitigation", "nope"], "unknown mitigation 'nope'"),
        (["--guard", "--model", "builtin:tiny-unet2d-class"], "--guard needs a noise-norm calibration"),
        (["--encoder", str(tmp_path)], "--encoder goes with an embedding index"),
        (
            ["--index", str(embedding_index / "index"), "--encoder", str(embedding_index / "encoder")],
            "built with another encoder",
        ),
    ]
    for extra, message in cases:
        assert run(["generate", "a cat", "--steps", "2", "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_evaluation_measures_each_method_on_each_group(sd, pixel_index, training_images):
    reference = ReferenceSet(TrainingSetIndex.load(pixel_index))
    groups = {"memorized": PROMPTS[:2], "heldout": PROMPTS[2:]}

    class Features(torch.nn.Module):
        def forward(self, images):
            return F.adaptive_avg_pool2d(images, 2).flatten(1)

    quality = Quality(training_images[2:20], Features(), kid_subset_size=4)
    results = evaluate_mitigations(
        sd,
        groups,
        ["none", "amg:gate=never", "amg:gate=always,c3=2000"],
        [Measure(reference, 1.4)],
        reference,
        n_generations=2,
        sampling=SamplingOptions(3, 7.5),
        quality=quality,
        control_group="heldout",
        alignment=lambda images, prompts: (
            images.mean((1, 2, 3)) * torch.tensor([len(p) > 12 for p in prompts])
        ),
    )
    plain, watched, guided = results
    assert plain.summaries["memorized"]["nl2"].top1 == pytest.approx(0.0, abs=1e-4)  # exact copies
    assert plain.summaries["memorized"]["nl2"].share_memorized >= 0.5  # generation 0 is in the training set
    assert (
        watched.summaries == plain.summaries and watched.guided_share == 0.0
    )  # a closed gate changes nothing
    assert guided.summaries["memorized"]["nl2"].top1 > 0.1 and guided.guided_share == 1.0
    assert plain.rows.num_rows == 8 and set(plain.rows["group"].to_pylist()) == {"memorized", "heldout"}
    heldout = plain.rows.filter(pc.equal(plain.rows["group"], "heldout"))
    assert plain.alignment["heldout"] == pytest.approx(sum(heldout["alignment"].to_pylist()) / 4)
    assert heldout["alignment"].to_pylist()[:2] == [0.0, 0.0]  # "a blue bag" is the asked-for prompt
    assert plain.fid is not None and plain.kid is not None and plain.unet_evaluations_per_image == 6
    table = results_markdown(results)
    assert "`amg:gate=never`" in table and "memorized nl2 <1.4" in table


def test_eval_mitigate_command_writes_the_table(tmp_path, pixel_index):
    labels = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table({"caption": PROMPTS, "group": ["memorized", "memorized", "heldout", "heldout"]}), labels
    )
    out = tmp_path / "eval"
    args = [
        "eval",
        "mitigate",
        "--model",
        "builtin:tiny-sd",
        "--labels",
        str(labels),
        "--index",
        str(pixel_index),
    ]
    args += [
        "--method",
        "none",
        "--method",
        "cwr",
        "--n-generations",
        "1",
        "--num-inference-steps",
        "2",
        "--out",
        str(out),
    ]
    assert run(args) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in record["results"]] == ["none", "cwr"]
    assert record["prompts"] == {"memorized": 2, "heldout": 2}
    assert pq.read_table(out / "images.parquet").num_rows == 8
    assert "| `cwr` |" in (out / "results.md").read_text()


def test_the_lab_model_ships_its_training_set_index_for_amg_and_eval(tmp_path):
    out = tmp_path / "amg"
    prompt = "the droquo dulyr poster: a red shirt at the top left on a black background"
    args = [
        "generate",
        prompt,
        "--model",
        "builtin:lab-micro",
        "--mitigation",
        "amg:gate=always",
        "--steps",
        "3",
    ]
    assert run([*args, "--out", str(out)]) == 0
    row = pq.read_table(out / "generations.parquet").to_pylist()[0]
    assert row["method"] == "amg" and row["guided_steps"] == 3 and row["amg_nearest_id"] is not None
    report = tmp_path / "eval"
    args = [
        "eval",
        "mitigate",
        "--max-prompts-per-group",
        "1",
        "--n-generations",
        "1",
        "--num-inference-steps",
        "2",
    ]
    assert run([*args, "--method", "none", "--out", str(report)]) == 0
    record = json.loads((report / "results.json").read_text())
    assert "copy_similarity" in record["results"][0]["summaries"]["memorized"]


def test_eval_mitigate_in_guard_mode_mitigates_only_flagged_prompts(tmp_path):
    args = ["eval", "mitigate", "--max-prompts-per-group", "3", "--n-generations", "1"]
    args += ["--num-inference-steps", "2"]
    assert run([*args, "--method", "none", "--method", "cwr", "--out", str(tmp_path / "plain")]) == 0
    assert run([*args, "--method", "cwr", "--guard", "--out", str(tmp_path / "guarded")]) == 0
    record = json.loads((tmp_path / "guarded" / "results.json").read_text())
    threshold = record["guard_threshold"]
    assert [r["name"] for r in record["results"]] == ["guard+cwr"] and threshold is not None
    rows = pq.read_table(tmp_path / "plain" / "images.parquet").to_pylist()
    plain, repeated = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    guarded = pq.read_table(tmp_path / "guarded" / "images.parquet").to_pylist()
    flagged = [r["guard_score"] > threshold for r in guarded]
    assert any(flagged) and not all(flagged)  # the shipped calibration separates some of these prompts
    for untouched, mitigated, after, was_flagged in zip(plain, repeated, guarded, flagged):
        assert after["mitigation"] == "guard+cwr"
        assert after["method"] == ("cwr" if was_flagged else "none")
        assert after["prompt_used"] == (mitigated if was_flagged else untouched)["prompt_used"]
        if not was_flagged:
            assert after["copy_similarity"] == untouched["copy_similarity"]  # sampled as plain sampling


def test_eval_mitigate_guards_a_model_without_a_calibration_by_its_self_calibration(tmp_path, pixel_index):
    from diffmem.models.source import ModelSource
    from diffmem.workflows.calibrate import model_profile

    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"caption": PROMPTS, "group": ["memorized"] * 2 + ["heldout"] * 2}), labels)
    args = ["eval", "mitigate", "--model", "builtin:tiny-sd", "--labels", str(labels), "--method", "cwr"]
    args += ["--n-generations", "1", "--num-inference-steps", "2", "--index", str(pixel_index), "--guard"]
    assert run([*args, "--out", str(tmp_path / "x")]) == 0
    record = json.loads((tmp_path / "x" / "results.json").read_text())
    # the profile against the command's index (cached by the run above), not the neutral prompts'
    profile = model_profile(ModelSource.resolve("builtin:tiny-sd"), index=pixel_index)
    assert profile.reference == "index captions"
    assert record["guard_threshold"] == pytest.approx(profile.detection_threshold)


def test_prompt_optimisation_takes_its_target_from_the_profile_against_the_given_index(
    tmp_path, pixel_index, monkeypatch
):
    """The same profile whichever method asks: with --index, the index's single-copy captions."""
    from diffmem.models.source import ModelSource
    from diffmem.workflows.calibrate import model_profile

    monkeypatch.setenv("DIFFMEM_CACHE_DIR", str(tmp_path / "cache"))  # no profile another test calibrated

    args = ["generate", PROMPTS[0], "--mitigation", "prompt_optimization", "--steps", "2"]
    assert run([*args, "--index", str(pixel_index), "--out", str(tmp_path / "indexed")]) == 0
    assert run([*args, "--out", str(tmp_path / "neutral")]) == 0
    source = ModelSource.resolve("builtin:tiny-sd")
    indexed, neutral = model_profile(source, index=pixel_index), model_profile(source)
    assert (indexed.reference, neutral.reference) == ("index captions", "neutral")
    for out, profile in (("indexed", indexed), ("neutral", neutral)):
        settings = json.loads((tmp_path / out / "summary.json").read_text())["config"]["mitigation_settings"]
        assert settings["target"] == pytest.approx(profile.prompt_target)
    assert indexed.prompt_target != pytest.approx(neutral.prompt_target)


def test_eval_mitigate_measures_fid_against_any_image_folder(tmp_path, training_images):
    """Real images of any size come from a generic folder at the model's resolution; a bad row is skipped."""
    import numpy as np
    from PIL import Image

    from diffmem.index.build import describe_encoder

    encoder = CopyDetectionEncoder().eval()
    save_encoder(encoder, tmp_path / "encoder")
    with torch.no_grad():
        vectors = encoder(training_images)
    TrainingSetIndex.build_embeddings(
        vectors, ["x"] * len(vectors), encoder=describe_encoder(tmp_path / "encoder")
    ).save(tmp_path / "index")
    folder, rng = tmp_path / "photos", np.random.default_rng(0)
    folder.mkdir()
    for i, (width, height) in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"photo {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [*rows, {"file_name": "gone.png", "text": "missing"}])
    )
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"caption": PROMPTS, "group": ["memorized"] * 2 + ["heldout"] * 2}), labels)
    args = ["eval", "mitigate", "--model", "builtin:tiny-sd", "--labels", str(labels)]
    args += [
        "--index",
        str(tmp_path / "index"),
        "--encoder",
        str(tmp_path / "encoder"),
        "--data",
        str(folder),
    ]
    args += [
        "--method",
        "none",
        "--n-generations",
        "2",
        "--num-inference-steps",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    assert run(args) == 0
    (result,) = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert result["fid"] is not None and np.isfinite(result["fid"]) and result["fid"] > 0
    assert run([*args[:-1], str(tmp_path / "o2"), "--data", str(tmp_path / "nowhere")]) == 2
