"""The catalogue of bad inputs: each case is something a user or a hostile client did, and what diffmem
must answer (a clear one-line error, a refusal that loses nothing, or rows that say why they have no
score). Cases of the page's API are in test_serve_requests.py, of prompt files in test_prompt_files.py."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.cli.main import run
from diffmem.core.method_spec import parse_method_spec
from diffmem.detect.calibration import Calibration
from diffmem.errors import DiffmemError
from diffmem.index.build import open_encoder
from diffmem.mitigate import mitigation_config

TINY = ["--model", "builtin:tiny-sd"]
PROMPTS = ["a red sneaker at the top left", "a blue bag on a gray background"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS))
    return path


def calibration_of(tmp_path, **changes) -> str:
    """A calibration file of builtin:tiny-sd for first-step noise norm at 3 steps, with ``changes``."""
    settings = {"num_inference_steps": 3, "steps": 1, "n_generations": 1, "guidance_scale": 7.5}
    settings |= {"base_seed": 0, "batch_size": 32, "shared_noise": False}
    record = Calibration("noise_norm", settings, "builtin:tiny-sd", 0.01, 10.0, 10, 0.0)
    path = tmp_path / "calibration.json"
    record.save(path)
    if changes:
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return str(path)


# --- scan: resume identity, summary of rows without a score -------------------------------------------


def test_a_scan_resumes_only_with_the_dtype_and_device_it_started_with(tmp_path, prompt_file, capsys):
    args = ["scan", *TINY, "--prompts", str(prompt_file), "--num-inference-steps", "3"]
    out = str(tmp_path / "scan")
    assert run([*args, "--out", out]) == 0
    capsys.readouterr()
    assert run(["--dtype", "bfloat16", *args, "--out", out, "--resume"]) == 2
    assert "dtype differ from the interrupted scan's" in one_line_error(capsys)
    settings = json.loads((tmp_path / "scan" / "scan_settings.json").read_text())
    assert settings["dtype"] == "float32" and settings["device_type"] == "cpu"
    assert run([*args, "--out", out, "--resume"]) == 0


def test_resuming_a_scan_that_does_not_exist_is_refused(tmp_path, prompt_file, capsys):
    args = ["scan", *TINY, "--prompts", str(prompt_file), "--out", str(tmp_path / "none"), "--resume"]
    assert run(args) == 2
    assert "nothing to resume" in one_line_error(capsys) and not (tmp_path / "none").exists()


def test_a_scan_of_undecodable_lines_says_why_no_row_has_a_score(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a scan with nothing to score measured a threshold")

    monkeypatch.setattr("diffmem.workflows.scan.detection_threshold", never)
    prompts = tmp_path / "bad.txt"
    prompts.write_bytes(b"\xff\xfe a red \xc3\n\x80\x81 sneaker\n")
    assert run(["scan", *TINY, "--prompts", str(prompts), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "2 prompts have no score: 2 not valid UTF-8 text (column status)" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())["results"]
    assert summary["scored"] == 0 and summary["unscored"] == {"not_utf8": 2}


# --- calibrations: a given one must apply; a bad one says what is wrong ------------------------------


@pytest.mark.parametrize("command", ["explain", "serve"])
def test_a_missing_or_foreign_calibration_stops_explain_and_serve(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffmem.serve.ExplanationServer", None)  # never reached: no server starts
    args = [
        command,
        *(["a red sneaker"] if command == "explain" else []),
        *TINY,
        "--num-inference-steps",
        "3",
    ]
    args += ["--out", str(tmp_path / "e")] if command == "explain" else []
    assert run([*args, "--calibration", str(tmp_path / "absent.json")]) == 2
    assert "calibration file not found" in one_line_error(capsys)
    assert run([*args, "--calibration", calibration_of(tmp_path, model_hash="0123456789abcdef")]) == 2
    assert "does not apply: the calibration was made for model 0123456789ab" in one_line_error(capsys)
    assert not (tmp_path / "e").exists()


def test_explain_says_why_the_lab_calibration_does_not_flag_other_settings(tmp_path, capsys):
    args = ["explain", "the sulrhaquin quoobvel poster", "--model", "builtin:lab-micro"]
    assert run([*args, "--first-steps", "2", "--out", str(tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert "not flagging: the lab model's calibration does not apply" in captured.err
    assert "steps=2 (calibrated 1)" in captured.err and "threshold" not in captured.out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": "abc"}, "threshold must be a number; got 'abc'"),
        ({"threshold": float("inf")}, "threshold must be a finite number"),
        ({"settings": None}, "settings must be dict"),
        ({"extra": 1}, "unknown fields extra"),
    ],
)
def test_a_malformed_calibration_says_what_is_wrong(tmp_path, changes, message):
    with pytest.raises(DiffmemError, match=message):
        Calibration.load(calibration_of(tmp_path, **changes))
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"threshold": 1.0}))
    with pytest.raises(DiffmemError, match="missing detector, settings, model_hash"):
        Calibration.load(path)


# --- outputs are never silently replaced -------------------------------------------------------------


def test_generate_refuses_an_earlier_run_and_replaces_it_whole_with_overwrite(tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", *TINY, "--steps", "1", "--out", str(out)]
    assert run([*args, *PROMPTS]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000_00.png", "000001_00.png"]
    capsys.readouterr()
    assert run([*args, PROMPTS[0]]) == 2
    assert "holds an earlier run; choose another --out or pass --overwrite" in one_line_error(capsys)
    assert len(pq.read_table(out / "generations.parquet")) == 2  # untouched
    assert run([*args, PROMPTS[0], "--overwrite"]) == 0
    assert [p.name for p in (out / "images").iterdir()] == ["000000_00.png"]  # no stale image left
    assert len(pq.read_table(out / "generations.parquet")) == 1
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert run(["generate", *TINY, "--steps", "1", "--out", str(tmp_path / "mine"), "--overwrite", "a"]) == 2
    assert "holds files this command did not write (notes.txt)" in one_line_error(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_calibrate_refuses_to_overwrite_a_file_unless_told(tmp_path, prompt_file, capsys):
    out = tmp_path / "c.json"
    out.write_text("mine")
    args = [
        "calibrate",
        *TINY,
        "--prompts",
        str(prompt_file),
        "--num-inference-steps",
        "2",
        "--out",
        str(out),
    ]
    assert run(args) == 2
    assert "exists; choose another --out or pass --overwrite" in one_line_error(capsys)
    assert out.read_text() == "mine"
    assert run([*args, "--overwrite"]) == 0 and Calibration.load(out).num_prompts == 2


# --- values no run can use are refused before any work ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", *TINY, "--first-steps", "0"], "the first steps to measure must be between 1 and"),
        (["serve", *TINY, "--guidance-scale", "nan"], "guidance_scale must be a finite number; got nan"),
        (["explain", "a", *TINY, "--first-steps", "9", "--num-inference-steps", "3"], "got 9"),
        (["explain", "a", *TINY, "--n-generations", "0"], "n_generations must be at least 1"),
        (["scan", *TINY, "--prompts", "p.txt", "--guidance-scale", "inf"], "got inf"),
        (["generate", "a", *TINY, "--guidance-scale", "nan"], "finite non-negative number; got nan"),
        (
            ["generate", "a", "--model", "builtin:lab-micro", "--mitigation", "amg:gate_shift=abc"],
            "gate_shift takes",
        ),
        (["generate", "a", *TINY, "--mitigation", "gni:std=[1]"], "std takes a number; got [1]"),
        (["generate", "a", *TINY, "--mitigation", "rt:insertions=1.5"], "insertions takes a whole number"),
    ],
)
def test_unusable_values_are_one_line_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red sneaker")
    monkeypatch.setattr("diffmem.serve.ExplanationServer", None)  # a server that started would fail
    assert run([*args, "--out", "o"] if args[0] in ("generate", "explain", "scan") else args) == 2
    assert message in one_line_error(capsys) and not (tmp_path / "o").exists()


def test_method_settings_are_read_as_their_declared_types():
    reference = object()
    config = mitigation_config("amg", reference=reference, **parse_method_spec("amg:gate_shift=1,c3=all")[1])
    assert config.gate_shift == 1.0 and isinstance(config.gate_shift, float) and config.c3 is None
    terms = parse_method_spec('amg:terms=["despecification"]')[1]
    assert mitigation_config("amg", reference=reference, **terms).terms == ("despecification",)
    with pytest.raises(DiffmemError, match="terms takes a list; got 'abc'"):
        mitigation_config("amg", reference=reference, terms="abc")
    with pytest.raises(DiffmemError, match="check_every takes a whole number; got True"):
        mitigation_config("amg", reference=reference, check_every=True)


def test_a_config_file_value_of_the_wrong_type_names_the_file_and_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("seed: abc\n")
    assert run(["--config", str(config), "info"]) == 2
    err = one_line_error(capsys)
    assert f"config file {config}: seed: " in err and "integer" in err and "--seed" not in err


# --- paths that are not what they claim ---------------------------------------------------------------


def test_a_model_path_that_is_a_file_says_so(tmp_path, prompt_file, capsys):
    weights = tmp_path / "diffusion_pytorch_model.bin"
    weights.write_bytes(b"\0" * 16)
    assert run(["scan", "--model", str(weights), "--prompts", str(prompt_file), "--out", "o"]) == 2
    assert "is a file; give a diffusers model directory" in one_line_error(capsys)
    checkpoint = tmp_path / "v1-5-pruned-emaonly.safetensors"  # a single file: its configs must be given
    checkpoint.write_bytes(b"\0" * 16)
    assert run(["scan", "--model", str(checkpoint), "--prompts", str(prompt_file), "--out", "o"]) == 2
    assert "is a single-file checkpoint: give --model-config DIR" in one_line_error(capsys)


def test_an_encoder_that_is_not_one_says_what_to_pass(tmp_path):
    fake = tmp_path / "encoder.pt"
    fake.write_bytes(b"not a zip file")
    with pytest.raises(DiffmemError, match="is not a TorchScript model .*pass a copy-detection encoder"):
        open_encoder(fake)
    directory = tmp_path / "encoder"
    directory.mkdir()
    (directory / "config.json").write_text('{"kind": "diffmem.copy_detection", "widths": "x"}')
    (directory / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffmemError, match="does not hold a working copy-detection encoder"):
        open_encoder(directory)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_an_image_folder_row_outside_it_is_counted_and_never_read(tmp_path, name, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "inside.png")
    pq.write_table(
        pa.table({"file_name": ["inside.png", name], "caption": ["a", "b"]}), folder / "metadata.parquet"
    )
    assert run(["index", "build", str(folder), "--out", str(tmp_path / "index")]) == 0
    assert "1 of 2 rows usable" in capsys.readouterr().out
    report = json.loads((tmp_path / "index" / "data_report.json").read_text())
    assert report["bad"] == {"file outside the folder": 1}
    assert report["examples"]["file outside the folder"] == [name]
    assert len(pq.read_table(tmp_path / "index" / "metadata.parquet")) == 1


# --- prompts that are not text, and bytes that would drive the terminal -------------------------------


def test_a_prompt_with_undecodable_bytes_is_a_clear_error(tmp_path, capsys):
    prompt = b"a red \xff sneaker".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    assert run(["explain", prompt, *TINY, "--num-inference-steps", "2", "--out", str(tmp_path / "e")]) == 2
    assert "is not valid text: it holds undecodable character '\\udcff'" in one_line_error(capsys)


def test_control_bytes_of_a_prompt_are_not_echoed_raw(tmp_path, capsys):
    prompt = "a red \x1b[2J\x07sneaker"
    assert run(["explain", prompt, *TINY, "--num-inference-steps", "2", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\x07" not in out and "\\x1b[2J\\x07sneaker" in out
    assert run(["info", "/no/such/\x1b[31mmodel"]) == 2
    err = one_line_error(capsys)
    assert "\x1b" not in err and "\\x1b[31mmodel" in err
