"""The command line: info, generate, config files, and one-line errors."""

import json

import pyarrow.parquet as pq
import pytest

from diffmem.cli.main import run
from diffmem.models.tiny import tiny_stable_diffusion
from diffmem.sampling import generation_seed


def test_info_on_the_builtin_default(capsys):
    assert run(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "builtin:tiny-sd" and info["family"] == "stable-diffusion"
    assert info["text_encoders"][0]["class_name"] == "CLIPTextModel"


def test_info_on_a_directory_with_global_dtype(tmp_path, capsys):
    tiny_stable_diffusion(prediction_type="v_prediction").save_pretrained(tmp_path)
    assert run(["--dtype", "bfloat16", "info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prediction_type"] == "v_prediction" and info["dtype"] == "bfloat16"


def test_info_table(capsys):
    assert run(["info", "builtin:tiny-unet2d-class"]) == 0
    out = capsys.readouterr().out
    assert "unet2d" in out and "class" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/no/such/model"], "error: no such model directory: /no/such/model"),
        (["info", "builtin:nope"], "error: unknown built-in model 'builtin:nope'"),
        (["--device", "cuda:0", "info"], "error: CUDA is not available on this machine; use --device cpu"),
        (["--dtype", "float8", "info"], "error: unknown dtype 'float8'"),
        (["generate", "--model", "builtin:tiny-unet2d", "a cat"], "error: this model is unconditional"),
        (
            ["generate", "--model", "builtin:tiny-unet2d-class", "cat"],
            "error: this model is class-conditional",
        ),
        (["generate"], "error: give prompts as arguments or with --prompts-file"),
        (
            ["generate", "a", "--guidance-scale", "-2"],
            "error: guidance_scale must be a finite non-negative number",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, capsys, tmp_path):
    if args[0] == "generate":
        args = [*args, "--out", str(tmp_path / "out"), "--steps", "1"]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    assert run(["--debug", "info", "/no/such/model"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_not_a_model_directory(tmp_path, capsys):
    assert run(["info", str(tmp_path)]) == 2
    assert "save one with pipeline.save_pretrained(DIR)" in capsys.readouterr().err


def test_generate_writes_images_rows_and_summary(tmp_path):
    out = tmp_path / "gen"
    args = ["--seed", "4", "generate", "a red sneaker", "a blue bag", "--out", str(out)]
    assert run([*args, "--n-generations", "2", "--num-inference-steps", "2"]) == 0
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [(r["prompt_id"], r["generation"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["seed"] for r in rows] == [generation_seed(4, p, g) for p in (0, 1) for g in (0, 1)]
    assert all((out / r["image"]).is_file() for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["num_inference_steps"] == 2 and summary["config"]["seed"] == 4
    assert summary["environment"]["versions"]["diffusers"] and summary["results"]["images"] == 4


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seed: 9\nnum_inference_steps: 1\nn-generations: 3\nmodel: builtin:tiny-unet2d\n")
    out = tmp_path / "gen"
    assert run(["--config", str(config), "generate", "--out", str(out), "--n-generations", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())["config"]
    assert summary["seed"] == 9 and summary["num_inference_steps"] == 1 and summary["n_generations"] == 2
    assert summary["model"] == "builtin:tiny-unet2d"


def test_config_file_json_and_unknown_keys(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"seed": 1, "guidance": 3}))
    assert run(["--config", str(config), "info"]) == 2
    assert "unknown keys in config file: guidance" in capsys.readouterr().err
    assert run(["--config", str(tmp_path / "absent.yaml"), "info"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_generate_from_a_prompt_file_with_class_labels(tmp_path):
    prompts = tmp_path / "labels.txt"
    prompts.write_text("3\n7\n")
    out = tmp_path / "gen"
    args = [
        "generate",
        "--model",
        "builtin:tiny-unet2d-class",
        "--prompts-file",
        str(prompts),
        "--out",
        str(out),
    ]
    assert run([*args, "--steps", "2", "--guidance-scale", "2.0"]) == 0
    assert [r["prompt"] for r in pq.read_table(out / "generations.parquet").to_pylist()] == ["3", "7"]
