"""The training-set index: exact and IVF-PQ search, caption counts, save/load, sources and the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex, clip_retrieval_source
from diffmem.index.captions import most_frequent_captions
from diffmem.index.faiss_index import IVF_MIN_ROWS
from diffmem.lab.dataset import LabConfig, build_lab_dataset, load_lab_dataset
from diffmem.lab.fashion_mnist import load_fashion_mnist
from diffmem.metrics.copy_detection import CopyDetectionConfig, CopyDetectionEncoder, embed, save_encoder
from diffmem.metrics.nl2 import pairwise_l2

TINY_LAB = LabConfig(
    image_size=16,
    num_memorized=3,
    memorized_repeats=4,
    num_duplicated_image=2,
    duplicated_image_repeats=3,
    num_unique=20,
    num_heldout=2,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=generator(seed)), dim=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(300, 3, 8, 8, generator=generator(1))


@pytest.fixture(scope="module")
def pixel_index(images) -> TrainingSetIndex:
    return TrainingSetIndex.build_pixels(images, [f"caption {i % 250}" for i in range(len(images))])


@pytest.fixture(scope="module")
def ivf_embeddings() -> torch.Tensor:
    return unit(2000, 32, seed=2)


@pytest.fixture(scope="module")
def ivf_index(ivf_embeddings) -> TrainingSetIndex:
    return TrainingSetIndex.build_embeddings(ivf_embeddings, ["x"] * len(ivf_embeddings), exact=False)


def test_exact_pixel_search_equals_brute_force_l2(pixel_index, images):
    queries = torch.rand(6, 3, 8, 8, generator=generator(3))
    found = pixel_index.search(queries, k=7)
    expected = pairwise_l2(queries, images).topk(7, dim=1, largest=False)
    assert pixel_index.exact and pixel_index.kind == "pixels" and pixel_index.image_shape == (3, 8, 8)
    assert len(pixel_index) == 300 and pixel_index.dim == 192
    assert found.index.dtype == torch.int64 and found.index.shape == (6, 7)
    assert torch.equal(found.index, expected.indices)
    torch.testing.assert_close(found.distance, expected.values, rtol=0, atol=1e-6)
    assert (found.distance.diff(dim=1) >= 0).all()


def test_exact_embedding_search_equals_dot_products():
    embeddings, queries = unit(400, 32, seed=4), unit(5, 32, seed=5)
    index = TrainingSetIndex.build_embeddings(embeddings, ["c"] * 400, encoder="my encoder")
    found = index.search(queries, k=4)
    expected = (queries @ embeddings.T).topk(4, dim=1)
    assert index.exact and index.manifest.structure == "IndexFlatIP" and index.encoder == "my encoder"
    assert torch.equal(found.index, expected.indices)
    torch.testing.assert_close(found.distance, expected.values, rtol=0, atol=1e-6)
    assert (found.distance.diff(dim=1) <= 0).all()


def test_ivf_pq_reranked_finds_a_near_duplicates_source(ivf_index, ivf_embeddings):
    source = torch.arange(0, 2000, 20)
    queries = F.normalize(
        ivf_embeddings[source] + 0.02 * torch.randn(len(source), 32, generator=generator(6)), dim=1
    )
    found = ivf_index.search(queries, k=3)
    assert not ivf_index.exact and ivf_index.manifest.structure.startswith("IVF")
    assert torch.equal(found.index[:, 0], source)
    exact = (queries[:, None, :] * ivf_embeddings[found.index]).sum(-1)  # re-ranked: exact cosines
    torch.testing.assert_close(found.distance, exact, rtol=0, atol=1e-6)


def test_ivf_pq_searches_every_cell_when_the_probed_ones_hold_fewer_than_k(ivf_index, ivf_embeddings):
    queries = unit(2, 32, seed=13)
    found = ivf_index.search(queries, k=len(ivf_index))  # far more than the probed cells hold
    expected = (queries.double() @ ivf_embeddings.double().T).sort(dim=1, descending=True)
    assert ivf_index.manifest.ivf_pq.nprobe < ivf_index.manifest.ivf_pq.nlist
    assert torch.equal(found.index, expected.indices)


def test_ivf_pq_pixels_rerank_to_exact_l2():
    images = torch.rand(IVF_MIN_ROWS, 3, 2, 2, generator=generator(7))
    index = TrainingSetIndex.build_pixels(images, ["c"] * len(images), exact=False)
    queries = (images[:20] + 0.01 * torch.randn(20, 3, 2, 2, generator=generator(8))).clamp(0, 1)
    found = index.search(queries, k=2, rerank=64)
    assert not index.exact and torch.equal(found.index[:, 0], torch.arange(20))
    torch.testing.assert_close(
        found.distance, pairwise_l2(queries, images).gather(1, found.index), atol=1e-6, rtol=0
    )


def test_save_load_round_trip_gives_identical_results(tmp_path, pixel_index, ivf_index, ivf_embeddings):
    for index, queries in (
        (pixel_index, torch.rand(4, 3, 8, 8, generator=generator(9))),
        (ivf_index, unit(4, 32, seed=10)),
    ):
        loaded = TrainingSetIndex.load(index.save(tmp_path / index.kind))
        assert loaded.manifest == index.manifest
        assert (loaded.captions, loaded.caption_counts, loaded.ids) == (
            index.captions,
            index.caption_counts,
            index.ids,
        )
        before, after = index.search(queries, k=5), loaded.search(queries, k=5)
        assert torch.equal(before.index, after.index) and torch.equal(before.distance, after.distance)
        rows = torch.tensor([[3, 1], [0, 2]])
        assert torch.equal(loaded.vectors(rows), index.vectors(rows))
    assert torch.equal(loaded.vectors(torch.tensor([7])), ivf_embeddings[7:8])


def test_vectors_are_the_stored_images(pixel_index, images):
    stored = pixel_index.vectors(torch.tensor([[5, 0, 9]]))
    assert stored.shape == (1, 3, 3, 8, 8) and torch.equal(stored[0], images[[5, 0, 9]])
    with pytest.raises(DiffmemError, match="rows must be between 0 and 299"):
        pixel_index.vectors(torch.tensor([300]))


def test_caption_counts_from_captions_or_given():
    images = torch.rand(5, 3, 4, 4, generator=generator(11))
    index = TrainingSetIndex.build_pixels(images, ["a", "b", "a", "c", "a"], ids=[10, 11, 12, 13, 14])
    assert index.caption_counts == [3, 1, 3, 1, 3] and index.ids == [10, 11, 12, 13, 14]
    assert index.manifest.duplicated_caption_rows == 3
    given = TrainingSetIndex.build_pixels(images, ["a", "b", "c", "d", "e"], caption_counts=[9, 1, 1, 2, 1])
    assert given.caption_counts == [9, 1, 1, 2, 1] and given.manifest.duplicated_caption_rows == 2


def test_most_frequent_caption_per_image_counts_the_whole_table():
    chosen = most_frequent_captions([7, 7, 2, 7, 2, 5], ["x", "y", "z", "y", "x", "y"])
    assert list(chosen) == [7, 2, 5]  # first appearance
    assert chosen == {7: ("y", 3), 2: ("z", 1), 5: ("y", 3)}  # ties: the earliest row's caption


def test_mismatched_queries_are_refused(pixel_index, ivf_index):
    with pytest.raises(
        DiffmemError, match=r"index holds 3x8x8 images; got 3x16x16: build the index at the model"
    ):
        pixel_index.search(torch.rand(2, 3, 16, 16), k=1)
    with pytest.raises(DiffmemError, match=r"index holds 3x8x8 images; got a tensor of shape \(2, 192\)"):
        pixel_index.check_queries(torch.rand(2, 192))
    with pytest.raises(DiffmemError, match="index holds 32-dim embeddings; got a tensor of shape"):
        ivf_index.search(unit(2, 64), k=1)
    with pytest.raises(DiffmemError, match="k must be between 1 and the index's 300 rows; got 301"):
        pixel_index.search(torch.rand(1, 3, 8, 8), k=301)
    with pytest.raises(DiffmemError, match=r"rerank \(2\) must be at least k \(3\)"):
        ivf_index.search(unit(1, 32), k=3, rerank=2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainingSetIndex.build_pixels(torch.full((2, 3, 4, 4), 2.0), ["a", "b"]), r"in \[0, 1\]"),
        (lambda: TrainingSetIndex.build_pixels(torch.rand(2, 1, 4, 4), ["a", "b"]), "RGB images"),
        (lambda: TrainingSetIndex.build_embeddings(torch.ones(2, 4), ["a", "b"]), "unit-normalised"),
        (lambda: TrainingSetIndex.build_embeddings(unit(2, 4), ["a"]), "captions has 1 entries for 2 rows"),
        (lambda: TrainingSetIndex.build_embeddings(unit(2, 4), ["a", "b"], ids=[1]), "ids has 1 entries"),
        (
            lambda: TrainingSetIndex.build_embeddings(unit(50, 4), ["a"] * 50, exact=False),
            "IVF-PQ needs at least",
        ),
    ],
)
def test_bad_build_input_is_refused(build, message):
    with pytest.raises(DiffmemError, match=message):
        build()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(directory: Path, **changes) -> None:
    record = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**record, **changes}))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: (d / "manifest.json").unlink(), "is not a training-set index"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "could not read the index manifest"),
        (lambda d: _edit_manifest(d, format_version=99), "holds index format 99"),
        (lambda d: _edit_manifest(d, dim=10), "need an image shape"),
        (lambda d: _edit_manifest(d, rows=299), "manifest says float32"),
        (lambda d: _edit_manifest(d, extra=1), "lacks or adds manifest fields"),
        (lambda d: (d / "vectors.npy").unlink(), "could not read .*vectors.npy"),
        (lambda d: _truncate(d / "vectors.npy"), "could not read .*vectors.npy"),
        (lambda d: _truncate(d / "index.faiss"), "is not a readable faiss index"),
        (lambda d: (d / "index.faiss").write_bytes(b"garbage" * 20), "is not a readable faiss index"),
        (lambda d: (d / "index.faiss").unlink(), "index.faiss is missing"),
        (lambda d: pq.write_table(pa.table({"id": [1]}), d / "metadata.parquet"), "does not hold 300 rows"),
        (lambda d: (d / "metadata.parquet").write_bytes(b"nope"), "could not read .*metadata.parquet"),
    ],
)
def test_corrupt_or_mismatched_index_is_refused(tmp_path, pixel_index, corrupt, message):
    directory = pixel_index.save(tmp_path / "index")
    corrupt(directory)
    with pytest.raises(DiffmemError, match=message) as error:
        TrainingSetIndex.load(directory)
    assert "\n" not in str(error.value)


def test_faiss_index_of_another_index_is_refused(tmp_path, pixel_index):
    other = TrainingSetIndex.build_pixels(torch.rand(30, 3, 8, 8), ["c"] * 30).save(tmp_path / "other")
    directory = pixel_index.save(tmp_path / "index")
    shutil.copy(other / "index.faiss", directory / "index.faiss")
    with pytest.raises(DiffmemError, match="does not match the manifest's IndexFlatL2 of 300 rows"):
        TrainingSetIndex.load(directory)


def test_save_refuses_to_replace_without_overwrite_or_a_non_index(tmp_path, pixel_index):
    directory = pixel_index.save(tmp_path / "index")
    with pytest.raises(DiffmemError, match="exists: choose a new path or pass overwrite"):
        pixel_index.save(directory)
    assert pixel_index.save(directory, overwrite=True) == directory
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(DiffmemError, match="is not a training-set index; refusing to replace it"):
        pixel_index.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def write_clip_retrieval(directory: Path, shards: list[tuple[torch.Tensor, list[str | None]]]) -> None:
    (directory / "img_emb").mkdir(parents=True)
    (directory / "metadata").mkdir()
    for i, (embeddings, captions) in enumerate(shards):
        np.save(directory / "img_emb" / f"img_emb_{i}.npy", embeddings.numpy().astype(np.float16))
        table = pa.table({"url": [f"u{i}-{j}" for j in range(len(captions))], "caption": captions})
        pq.write_table(table, directory / "metadata" / f"metadata_{i}.parquet")


def test_clip_retrieval_layout_loads_in_shard_order(tmp_path, capsys):
    embeddings = unit(30, 16, seed=12)
    captions = [f"c{i % 7}" for i in range(30)]
    captions[4] = None
    shards = [(embeddings[10 * i : 10 * (i + 1)], captions[10 * i : 10 * (i + 1)]) for i in range(3)]
    write_clip_retrieval(tmp_path / "clip", shards)
    source = clip_retrieval_source(tmp_path / "clip")
    torch.testing.assert_close(torch.from_numpy(source.embeddings), embeddings, atol=1e-3, rtol=0)
    assert source.captions[4] == "" and source.captions[:4] == ["c0", "c1", "c2", "c3"]
    assert source.caption_counts[0] == 5 and source.caption_counts[4] == 1 and source.ids == list(range(30))

    out = tmp_path / "index"
    assert run(["index", "build", "--embeddings", str(tmp_path / "clip"), "--out", str(out)]) == 0
    assert "30 rows of 16-dim embeddings, IndexFlatIP (exact)" in capsys.readouterr().out
    index = TrainingSetIndex.load(out)
    assert index.kind == "embedding" and index.search(embeddings[25:26], k=1).index.item() == 25
    args = [
        "index",
        "build",
        "--embeddings",
        str(tmp_path / "clip"),
        "--approximate",
        "--out",
        str(tmp_path / "a"),
    ]
    assert run(args) == 2
    assert "IVF-PQ needs at least 1000 rows to train its codebooks; got 30" in capsys.readouterr().err


def test_clip_retrieval_with_missing_metadata_shard_is_refused(tmp_path):
    write_clip_retrieval(tmp_path / "clip", [(unit(3, 8), ["a", "b", "c"]), (unit(3, 8), ["a", "b", "c"])])
    (tmp_path / "clip" / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(DiffmemError, match=r"every img_emb_\{i\}.npy needs its metadata_\{i\}.parquet"):
        clip_retrieval_source(tmp_path / "clip")


def write_image_folder(directory: Path, sizes: list[int]) -> list[np.ndarray]:
    """PNGs a.png, b.png, ... of the given sizes and a metadata.parquet repeating a.png with two captions."""
    directory.mkdir()
    arrays = [
        np.random.default_rng(i).integers(0, 256, (s, s, 3), dtype=np.uint8) for i, s in enumerate(sizes)
    ]
    names = [f"{chr(97 + i)}.png" for i in range(len(sizes))]
    for name, array in zip(names, arrays, strict=True):
        Image.fromarray(array).save(directory / name)
    rows = {
        "file_name": [names[0], names[1], names[0], *names[2:], names[0]],
        "caption": ["rare", "shared", "common", *["shared"] * (len(names) - 2), "common"],
    }
    pq.write_table(pa.table(rows), directory / "metadata.parquet")
    return arrays


def test_cli_builds_pixels_and_embeddings_from_an_image_folder(tmp_path, capsys):
    arrays = write_image_folder(tmp_path / "folder", [12] * 4)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    assert run(["index", "build", str(tmp_path / "folder"), "--out", str(tmp_path / "pixels")]) == 0
    index = TrainingSetIndex.load(tmp_path / "pixels")
    assert index.ids == [0, 1, 3, 4]  # each image's first metadata row
    assert index.captions == ["common", "shared", "shared", "shared"] and index.caption_counts == [2, 3, 3, 3]
    assert torch.equal(index.vectors(torch.arange(4)), images)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CopyDetectionEncoder(
            CopyDetectionConfig(input_size=8, widths=(8,), embedding_dim=16)
        ).eval()
    save_encoder(encoder, tmp_path / "enc")
    args = [
        "index",
        "build",
        str(tmp_path / "folder"),
        "--kind",
        "embedding",
        "--encoder",
        str(tmp_path / "enc"),
    ]
    assert run([*args, "--out", str(tmp_path / "emb")]) == 0
    assert "4 rows of 16-dim embeddings" in capsys.readouterr().out
    embedded = TrainingSetIndex.load(tmp_path / "emb")
    assert embedded.kind == "embedding" and embedded.encoder.startswith(
        f"{(tmp_path / 'enc').resolve()} sha256="
    )
    torch.testing.assert_close(embedded.vectors(torch.arange(4)), embed(encoder, images), atol=1e-5, rtol=0)


def test_image_folder_with_mixed_sizes_is_refused(tmp_path, capsys):
    write_image_folder(tmp_path / "folder", [12, 12, 16])
    assert run(["index", "build", str(tmp_path / "folder"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "c.png is 16x16, the first image 12x12: resize the images" in err and not (tmp_path / "out").exists()
    )


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory) -> Path:
    try:
        load_fashion_mnist("train")
    except DiffmemError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    return build_lab_dataset(tmp_path_factory.mktemp("lab") / "tiny", TINY_LAB, progress=False)


def test_cli_builds_a_pixel_index_of_a_lab_dataset(lab_dir, tmp_path, capsys):
    out = tmp_path / "index"
    assert run(["index", "build", str(lab_dir), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip()
    lab = load_lab_dataset(lab_dir)
    scene_ids, images = lab.unique_train_images()
    index = TrainingSetIndex.load(out)
    assert index.ids == scene_ids and len(index) == 25 and index.image_shape == (3, 16, 16)
    memorized = {p.scene_id: p.caption for p in lab.memorized_prompts()}
    for row, scene_id in enumerate(index.ids):
        if scene_id in memorized:
            assert (index.captions[row], index.caption_counts[row]) == (memorized[scene_id], 4)
    assert (
        f"25 rows of 3x16x16 images, IndexFlatL2 (exact), {index.manifest.duplicated_caption_rows} rows"
        in summary
    )
    assert index.manifest.duplicated_caption_rows >= 3
    found = index.search(images[[4, 0]], k=2)
    assert found.index[:, 0].tolist() == [4, 0] and (found.distance[:, 0] < 1e-6).all()

    assert run(["index", "build", str(lab_dir), "--out", str(out)]) == 2
    assert "exists: choose a new --out or pass --overwrite" in capsys.readouterr().err
    assert run(["index", "info", str(out)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert (
        manifest["kind"] == "pixels"
        and manifest["rows"] == 25
        and manifest["source"].startswith("lab dataset")
    )


def test_cli_refuses_conflicting_inputs(tmp_path, capsys):
    assert run(["index", "build", "--out", str(tmp_path / "out")]) == 2
    assert "give either DATA" in capsys.readouterr().err
    assert run(["index", "build", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is none of them: training data is a lab dataset (config.json), an image folder" in (
        capsys.readouterr().err
    )
    assert run(["index", "info", str(tmp_path)]) == 2
    assert "is not a training-set index (no manifest.json)" in capsys.readouterr().err
