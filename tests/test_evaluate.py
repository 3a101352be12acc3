"""``diffmem eval detect``: settings parsing, scores equal the detector's, metrics read off those scores."""

import json

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from diffmem.adapters import wrap_pipeline
from diffmem.cli.main import run
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.detect.evaluate import SettingSpec
from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion

PROMPTS = [
    "a red sneaker",
    "a blue bag",
    "three green hats",
    "a pink dress on navy",
    "a gray boot",
    "a shirt",
]


def test_setting_specs():
    spec = SettingSpec.parse("noise_norm:steps=all, n_generations=4,guidance_scale=5.5,shared_noise=true")
    assert spec.detector == "noise_norm"
    assert spec.settings == {"steps": None, "n_generations": 4, "guidance_scale": 5.5, "shared_noise": True}
    assert SettingSpec.parse("noise_norm").settings == {}
    with pytest.raises(DiffmemError, match="unknown detector 'noise'"):
        SettingSpec.parse("noise:steps=1")
    with pytest.raises(DiffmemError, match="write key=value pairs"):
        SettingSpec.parse("noise_norm:steps")


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [
        {"caption": p, "memorized": i % 2 == 0, "group": "memorized" if i % 2 == 0 else "heldout"}
        for i, p in enumerate(PROMPTS)
    ]
    rows.append({"caption": "an extra unique prompt", "memorized": False, "group": "unique"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_detect_writes_the_report_from_the_detectors_scores(tmp_path, labels):
    out = tmp_path / "eval"
    settings = [
        "--setting",
        "noise_norm:num_inference_steps=4",
        "--setting",
        "noise_norm:num_inference_steps=4,steps=all",
    ]
    args = ["--seed", "2", "eval", "detect", "--labels", str(labels), "--model", "builtin:tiny-sd"]
    assert run([*args, "--out", str(out), *settings, "--group", "memorized", "--group", "heldout"]) == 0
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert scores["prompt"] == PROMPTS  # the unique-group row is filtered out
    expected = noise_norm(
        wrap_pipeline(tiny_stable_diffusion()), PROMPTS, NoiseNormConfig(num_inference_steps=4, base_seed=2)
    )
    assert scores["noise_norm:num_inference_steps=4"] == pytest.approx(expected.scores.tolist(), rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    for name in ("noise_norm:num_inference_steps=4", "noise_norm:num_inference_steps=4,steps=all"):
        entry = next(s for s in results["settings"] if s["name"] == name)
        assert entry["metrics"]["auc"] == pytest.approx(roc_auc_score(scores["memorized"], scores[name]))
    evaluations = [s["unet_evaluations_per_prompt"] for s in results["settings"]]
    assert evaluations == [2, 8]
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_eval_detect_bad_input(tmp_path, labels, capsys):
    base = ["eval", "detect", "--model", "builtin:tiny-sd", "--out", str(tmp_path / "e")]
    assert run([*base, "--labels", str(tmp_path / "absent.parquet")]) == 2
    assert "labels file not found" in capsys.readouterr().err
    assert run([*base, "--labels", str(labels), "--label-column", "truth"]) == 2
    assert "has no column 'truth'" in capsys.readouterr().err
    assert run([*base, "--labels", str(labels), "--group", "heldout"]) == 2
    assert "needs memorized and non-memorized prompts; it has 0 of 3" in capsys.readouterr().err
    assert run([*base, "--labels", str(labels), "--setting", "noise_norm:bogus=1"]) == 2
    assert "has no setting bogus" in capsys.readouterr().err
