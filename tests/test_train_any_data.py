"""Fine-tuning on any training set: a lab dataset and its image-folder export train identically, bad rows
are reported and skipped, WebDataset shards train, the clean latents are cached on disk and reused until
the VAE or the preprocessing changes, and a resumed run refuses changed data."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.dataset import load_lab_dataset
from diffmem.lab.export import export_lab_dataset
from diffmem.models.source import shipped_directory
from diffmem.models.tiny import tiny_stable_diffusion, tiny_unet2d
from diffmem.train.fine_tune import FineTuneConfig, fine_tune
from diffmem.train.latent_cache import cached_latents, latent_cache_dir
from diffmem.train.training_set import DataOptions, read_training_set

LAB_MODEL = shipped_directory("builtin:lab-micro") / "model"
WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"
ONE_STEP = FineTuneConfig(steps=1, batch_size=2, lr=1e-3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Stable Diffusion pipeline directory (16 px images, 8x8 latents)."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    tiny_stable_diffusion().save_pretrained(directory)
    return directory


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A latent cache of this test's own."""
    monkeypatch.setenv("DIFFMEM_CACHE_DIR", str(tmp_path / "cache"))
    assert latent_cache_dir() == tmp_path / "cache" / "latents"
    return latent_cache_dir()


@pytest.fixture
def encodes(monkeypatch):
    """The number of VAE encoder calls made since the test started (a one-item list)."""
    calls, original = [0], AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def _image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _folder(directory, rows: list[dict], images: int = 6):
    """An image folder of ``images`` random non-square PNGs and a metadata.jsonl of ``rows``."""
    directory.mkdir(parents=True)
    for i in range(images):
        _image(i).save(directory / f"img{i}.png")
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def _good_rows(images: int = 6) -> list[dict]:
    return [{"file_name": f"img{i}.png", "text": f"a photo number {i}"} for i in range(images)]


def test_a_lab_dataset_and_its_exported_image_folder_train_identically(micro_lab_data, tmp_path, monkeypatch):
    folder = export_lab_dataset(micro_lab_data, tmp_path / "folder")
    policies = {"ambient": {"sigma_n": 0.5}, "captions": {"p": 0.5}, "filter": {"quantile": 0.5}}
    config = FineTuneConfig(steps=2, batch_size=4, lr=1e-3, max_images=40, policies=policies)
    for name, data in (("lab", micro_lab_data), ("folder", folder)):  # each encodes into its own cache
        monkeypatch.setenv("DIFFMEM_CACHE_DIR", str(tmp_path / f"cache-{name}"))
        assert fine_tune(LAB_MODEL, data, tmp_path / name, config, progress=False).complete
    lab_latents, folder_latents = (
        np.load(next((tmp_path / f"cache-{name}" / "latents").glob("*.npy"))) for name in ("lab", "folder")
    )
    vae = AutoencoderKL.from_pretrained(LAB_MODEL / "vae").eval()
    with torch.no_grad():  # the lab path's encoding as it always was: scaled posterior means of its images
        images = load_lab_dataset(micro_lab_data).unique_train_images()[1][:40]
        expected = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert lab_latents.shape == (40, 4, 8, 8)
    assert np.array_equal(lab_latents, expected.numpy()) and np.array_equal(folder_latents, lab_latents)
    lab, exported = (load_file(tmp_path / name / WEIGHTS) for name in ("lab", "folder"))
    assert all(torch.equal(lab[k], exported[k]) for k in lab)
    assert any(not torch.equal(v, load_file(LAB_MODEL / "unet/diffusion_pytorch_model.safetensors")[k])
               for k, v in lab.items())  # fmt: skip
    records = [json.loads((tmp_path / name / "fine_tune.json").read_text()) for name in ("lab", "folder")]
    assert records[0]["data_fingerprint"] == records[1]["data_fingerprint"]
    assert records[0]["filter_threshold"] == records[1]["filter_threshold"]  # the same samples dropped
    assert records[0]["drop_log"] == records[1]["drop_log"] and 0 < records[0]["drop_rate"] < 1
    assert records[0]["images"] == records[1]["images"] == 40
    assert records[0]["lab_config"] is not None and records[1]["data_report"]["usable"] == 956
    assert not (tmp_path / "lab" / "data_report.json").exists()
    assert (tmp_path / "folder" / "data_report.json").is_file()


def test_a_malformed_image_folder_trains_on_its_good_rows_and_reports_the_others(
    tiny_model, tmp_path, cache, capsys
):
    rows = _good_rows() + [
        {"file_name": "gone.png", "text": "a missing photo"},
        {"file_name": "broken.png", "text": "an unreadable photo"},
        {"file_name": "img0.png", "text": "  "},
    ]
    folder = _folder(tmp_path / "photos", rows)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--data", str(folder), "--out", str(out)]
    assert run([*args, "--steps", "2", "--batch-size", "2", "--random-flip"]) == 0
    printed = capsys.readouterr().out
    summary = [line for line in printed.splitlines() if "rows usable" in line]
    assert len(summary) == 1 and "6 of 9 rows usable" in summary[0]
    assert "1 empty caption, 1 missing file, 1 unreadable image" in summary[0]
    report = json.loads((out / "data_report.json").read_text())
    assert report["usable"] == 6 and report["rows"] == 9
    assert report["bad"] == {"empty caption": 1, "missing file": 1, "unreadable image": 1}
    assert report["examples"]["missing file"] == ["gone.png"]
    record = json.loads((out / "fine_tune.json").read_text())
    assert record["images"] == 6 and record["data_options"]["resolution"] == 16  # 8x8 latents x 2
    assert record["data_options"]["random_flip"] and len(list(cache.glob("*.npy"))) == 2  # as is, flipped


def test_the_latent_cache_is_reused_across_runs_and_policies(tiny_model, tmp_path, cache, encodes):
    folder = _folder(tmp_path / "photos", _good_rows())
    shutil.copyfile(folder / "img0.png", folder / "img5.png")  # one image under two names
    assert fine_tune(tiny_model, folder, tmp_path / "first", ONE_STEP, progress=False).complete
    assert encodes[0] == 1 and len(list(cache.glob("*.npy"))) == 1  # six images, one chunk
    dedup = FineTuneConfig(steps=1, batch_size=2, lr=1e-3, policies={"dedup": {}, "captions": {"p": 0.5}})
    assert fine_tune(tiny_model, folder, tmp_path / "second", dedup, progress=False).complete
    assert encodes[0] == 1  # the second run, other policies: the cached latents, no encoding
    deduplicated = json.loads((tmp_path / "second" / "fine_tune.json").read_text())["deduplication"]
    assert (deduplicated["rows_before"], deduplicated["rows_after"], deduplicated["images_dropped"]) == (
        6,
        5,
        1,
    )


def test_the_latent_cache_is_invalidated_by_the_vae_and_the_preprocessing(
    tiny_model, tmp_path, cache, encodes
):
    folder = _folder(tmp_path / "photos", _good_rows())
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    training = read_training_set(folder, DataOptions(), 16)
    digest = training.image_digest()
    latents = cached_latents(vae, training, digest, progress=False)
    assert isinstance(latents, np.memmap) and latents.shape == (6, 4, 8, 8) and encodes[0] == 1
    assert np.array_equal(cached_latents(vae, training, digest, progress=False), latents)
    assert encodes[0] == 1  # reused
    smaller = read_training_set(folder, DataOptions(resolution=8), 16)
    assert cached_latents(vae, smaller, smaller.image_digest(), progress=False).shape == (6, 4, 4, 4)
    assert encodes[0] == 2  # another resolution
    flipped = cached_latents(vae, training, digest, flipped=True, progress=False)
    assert np.array_equal(flipped, cached_latents(vae, training, digest, flipped=True, progress=False))
    assert encodes[0] == 3 and not np.array_equal(flipped, latents)  # the flipped images, once
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)  # another VAE
    assert not np.array_equal(cached_latents(vae, training, digest, progress=False), latents)
    assert encodes[0] == 4 and len(list(cache.glob("*.npy"))) == 4
    _image(99).save(folder / "img0.png")  # another image under the same name
    changed = read_training_set(folder, DataOptions(), 16)
    assert changed.image_digest() != digest


def test_random_crops_are_encoded_at_each_draw_and_never_cached(tiny_model, tmp_path, cache, encodes):
    folder = _folder(tmp_path / "photos", _good_rows())
    config = FineTuneConfig(steps=2, batch_size=2, lr=1e-3)
    options = DataOptions(center_crop=False, random_flip=True)
    assert fine_tune(
        tiny_model, folder, tmp_path / "run", config, progress=False, data_options=options
    ).complete
    assert encodes[0] == 2 and not cache.exists()  # one batch a step
    with pytest.raises(DiffmemError, match="use --center-crop with the ambient policy"):
        ambient = FineTuneConfig(steps=1, policies={"ambient": {}})
        fine_tune(tiny_model, folder, tmp_path / "ambient", ambient, progress=False, data_options=options)


def test_webdataset_shards_train(tiny_model, tmp_path, cache):
    shard = tmp_path / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            members = {f"{i:03d}.png": _png(_image(i, (16, 16)))}
            if i != 4:  # sample 4 has no caption
                members[f"{i:03d}.txt"] = f"sample {i}".encode()
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    out = tmp_path / "run"
    status = fine_tune(tiny_model, shard.parent, out, ONE_STEP, progress=False)
    assert status.complete and status.data_report.usable == 4
    assert json.loads((out / "data_report.json").read_text())["bad"] == {"image without caption": 1}
    assert json.loads((out / "fine_tune.json").read_text())["images"] == 4


def test_a_resumed_run_refuses_changed_data(tiny_model, tmp_path, cache):
    rows = _good_rows()
    folder = _folder(tmp_path / "photos", rows)
    config = FineTuneConfig(steps=3, batch_size=2, lr=1e-3)
    out = tmp_path / "run"
    assert not fine_tune(tiny_model, folder, out, config, time_budget_s=0.0, progress=False).complete
    assert not fine_tune(tiny_model, folder, out, config, time_budget_s=0.0, progress=False).complete  # same
    rows[2]["text"] = "another caption"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DiffmemError, match="holds a run on other data"):
        fine_tune(tiny_model, folder, out, config, progress=False)
    with pytest.raises(DiffmemError, match="holds a run on other data"):  # the same rows, other preparation
        fine_tune(tiny_model, folder, out, config, progress=False, data_options=DataOptions(resolution=8))


def test_unet2d_pipelines_still_need_a_lab_dataset(tmp_path):
    model = tmp_path / "unet2d"
    tiny_unet2d(class_conditional=True).save_pretrained(model)
    folder = _folder(tmp_path / "photos", _good_rows())
    with pytest.raises(
        DiffmemError, match="class-conditional UNet2DModel pipeline fine-tunes on a lab dataset"
    ):
        fine_tune(model, folder, tmp_path / "run", ONE_STEP, progress=False)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
