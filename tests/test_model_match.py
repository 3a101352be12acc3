"""An index built from another lab dataset than the model's is flagged; agreeing or unrecorded
provenance is not."""

import json
import shutil
from dataclasses import asdict, replace

from diffmem.cli.main import run
from diffmem.index.manifest import read_manifest
from diffmem.index.model_match import dataset_mismatch, model_lab_config
from diffmem.lab.dataset import ADDED_CONFIG_FIELDS, LabConfig, with_added_defaults
from diffmem.models.source import shipped_reference

MICRO = asdict(LabConfig.micro())
MICRO_LAB = "builtin:lab-micro"  # its model and index were made before the keyed lab's fields existed


def test_the_shipped_model_and_its_index_name_the_same_lab_dataset():
    index, _ = shipped_reference(MICRO_LAB)
    manifest = read_manifest(index / "manifest.json")
    # both were written before the keyed lab's fields existed: they read as those fields' defaults
    assert not ADDED_CONFIG_FIELDS & (model_lab_config(MICRO_LAB).keys() | manifest.lab_config.keys())
    assert (
        with_added_defaults(model_lab_config(MICRO_LAB)) == MICRO == with_added_defaults(manifest.lab_config)
    )
    assert dataset_mismatch(manifest, MICRO_LAB) is None
    assert dataset_mismatch(replace(manifest, lab_config=MICRO), MICRO_LAB) is None
    keyed = replace(manifest, lab_config={**MICRO, "background_pattern": 0.8})
    assert "(background_pattern differ" in dataset_mismatch(keyed, MICRO_LAB)
    other = replace(manifest, lab_config={**MICRO, "seed": 1, "num_unique": 50})
    assert "(num_unique, seed differ" in dataset_mismatch(other, MICRO_LAB)
    assert dataset_mismatch(replace(manifest, lab_config=None), MICRO_LAB) is None  # the index does not say
    assert dataset_mismatch(other, "builtin:tiny-sd") is None  # the model does not say


def test_a_fine_tuned_model_is_matched_by_the_dataset_it_was_fine_tuned_on(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "fine_tune.json").write_text(json.dumps({"lab_config": {**MICRO, "seed": 7}}))
    assert model_lab_config(tmp_path / "run" / "model") == {**MICRO, "seed": 7}


def test_an_index_without_provenance_still_opens(tmp_path):
    index, _ = shipped_reference(MICRO_LAB)
    old = shutil.copytree(index, tmp_path / "old")
    record = json.loads((old / "manifest.json").read_text())
    del record["lab_config"]
    (old / "manifest.json").write_text(json.dumps(record))
    assert read_manifest(old / "manifest.json").lab_config is None


def test_generate_warns_about_an_index_of_another_dataset(tmp_path, capsys):
    index, encoder = shipped_reference(MICRO_LAB)
    other = shutil.copytree(index, tmp_path / "other")
    record = json.loads((other / "manifest.json").read_text())
    record["lab_config"]["seed"] = 3
    (other / "manifest.json").write_text(json.dumps(record))
    args = ["generate", "a red shirt at the top left", "--model", MICRO_LAB, "--steps", "2"]
    args += ["--encoder", str(encoder)]
    assert run([*args, "--index", str(other), "--out", str(tmp_path / "a")]) == 0
    assert "another lab dataset than the model was trained on (seed differ" in capsys.readouterr().err
    assert run([*args, "--index", str(index), "--out", str(tmp_path / "b")]) == 0
    assert "another lab dataset" not in capsys.readouterr().err
