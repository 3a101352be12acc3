"""Training sets as people bring them: image folders, saved and cached ``datasets``, WebDataset shards;
bad rows counted and reported; preprocessing; a lab dataset exported as an image folder; the commands."""

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffmem.cli.main import run
from diffmem.data import preprocess, read_training_data
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.lab.dataset import load_lab_dataset


def pixels(seed: int, width: int = 10, height: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def write_metadata(directory: Path, records: list[dict], kind: str) -> None:
    if kind == "jsonl":
        lines = [json.dumps(record) for record in records]
        (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "csv":
        with (directory / "metadata.csv").open("w", newline="", encoding="utf-8-sig") as file:  # as Excel
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), directory / "metadata.parquet")


def image_folder(directory: Path, n: int = 3, kind: str = "jsonl", column: str = "text") -> list[np.ndarray]:
    """Images img0.png, sub/img1.png, ... of different sizes captioned "caption i", metadata of ``kind``."""
    directory.mkdir(parents=True)
    arrays = [pixels(i, 10 + i, 8) for i in range(n)]
    names = [f"img{i}.png" if i % 2 == 0 else f"sub/img{i}.png" for i in range(n)]
    for name, array in zip(names, arrays, strict=True):
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_bytes(png(array))
    write_metadata(directory, [{"file_name": m, column: f"caption {i}"} for i, m in enumerate(names)], kind)
    return arrays


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_an_image_folder_reads_each_metadata_format(tmp_path, kind):
    arrays = image_folder(tmp_path / "folder", kind=kind)
    data = read_training_data(tmp_path / "folder")
    assert [row.key for row in data.rows] == ["img0.png", "sub/img1.png", "img2.png"]
    assert [row.caption for row in data.rows] == ["caption 0", "caption 1", "caption 2"]
    for row, array in zip(data.rows, arrays, strict=True):
        assert np.array_equal(as_array(row.load()), array)
    assert data.report.to_dict()["bad"] == {} and data.report.usable == data.report.rows == 3
    assert data.report.caption_column == "text"


def test_the_caption_column_is_text_then_caption_or_the_one_chosen(tmp_path):
    image_folder(tmp_path / "captioned", column="caption")
    assert read_training_data(tmp_path / "captioned").report.caption_column == "caption"
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(pixels(0)))
    write_metadata(folder, [{"file_name": "a.png", "text": "from text", "caption": "from caption"}], "jsonl")
    assert read_training_data(folder).rows[0].caption == "from text"
    assert read_training_data(folder, caption_column="caption").rows[0].caption == "from caption"
    with pytest.raises(DiffmemError, match=r"has no 'prompt' column \(it has file_name, text, caption\)"):
        read_training_data(folder, caption_column="prompt")
    image_folder(tmp_path / "prompted", column="prompt")
    with pytest.raises(DiffmemError) as error:
        read_training_data(tmp_path / "prompted")
    message = str(error.value)
    assert "neither a 'text' nor a 'caption' column (it has file_name, prompt)" in message
    assert "--caption-column" in message and "\n" not in message
    assert read_training_data(tmp_path / "prompted", caption_column="prompt").rows[2].caption == "caption 2"


def test_bad_folder_rows_are_counted_by_reason_and_nothing_is_lost(tmp_path):
    folder = tmp_path / "folder"
    image_folder(folder, n=2)
    (folder / "corrupt.png").write_bytes(png(pixels(5))[:40])
    (folder / "stray.png").write_bytes(png(pixels(6)))
    (folder / "blank.png").write_bytes(png(pixels(7)))
    lines = (folder / "metadata.jsonl").read_bytes()
    lines += b'{"file_name": "gone.png", "text": "no file"}\n'
    lines += b'{"file_name": "corrupt.png", "text": "broken image"}\n'
    lines += b'{"file_name": "blank.png", "text": "  "}\n'
    lines += b'{"file_name": "img0.png", "text": "caf\xe9 in latin-1"}\n'
    lines += b'{"file_name": "../img0.png", "text": "escapes"}\n'
    lines += b'{"text": "no name"}\n'
    lines += b"{not json\n"
    (folder / "metadata.jsonl").write_bytes(lines)
    data = read_training_data(folder)
    report = data.report
    assert [row.caption for row in data.rows] == ["caption 0", "caption 1"]
    assert report.to_dict()["bad"] == {
        "caption not UTF-8": 1,
        "empty caption": 1,
        "file outside the folder": 1,
        "image not in metadata": 1,
        "metadata line not JSON": 1,
        "missing file": 1,
        "no file_name": 1,
        "unreadable image": 1,
    }
    assert report.rows == 10 and report.usable == 2  # 9 metadata lines and one stray image
    assert report.examples["missing file"] == ["gone.png"] and report.examples["image not in metadata"] == [
        "stray.png"
    ]
    assert "2 of 10 rows usable" in report.summary() and "1 unreadable image" in report.summary()
    saved = json.loads(report.save(tmp_path / "report.json").read_text())
    assert saved["bad"]["empty caption"] == 1 and saved["usable"] == 2 and saved["caption_column"] == "text"


def test_empty_captions_are_usable_when_captions_are_not_required(tmp_path):
    folder = tmp_path / "folder"
    image_folder(folder, n=2, kind="parquet")
    write_metadata(
        folder,
        [{"file_name": "img0.png", "text": None}, {"file_name": "sub/img1.png", "text": ""}],
        "parquet",
    )
    with pytest.raises(
        DiffmemError, match="no usable training row in .* 0 of 2 rows usable.*2 empty caption"
    ):
        read_training_data(folder)
    assert [row.caption for row in read_training_data(folder, require_captions=False).rows] == ["", ""]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda d: (d / "metadata.jsonl").write_text(""), "metadata.jsonl lists no rows"),
        (lambda d: (d / "metadata.jsonl").write_text("[1]\nnope\n"), r"lists no rows \(2 lines are not JSON"),
        (
            lambda d: write_metadata(d, [{"name": "img0.png", "text": "x"}], "jsonl"),
            "has no file_name column",
        ),
        (
            lambda d: write_metadata(d, [{"file_name": "img0.png", "text": "x"}], "csv"),
            "keep one metadata file",
        ),
        (
            lambda d: (d / "metadata.jsonl").rename(d / "metadata.parquet"),
            "could not read .*metadata.parquet",
        ),
        (
            lambda d: (d / "metadata.jsonl").unlink(),
            "has no metadata.jsonl, metadata.csv or metadata.parquet",
        ),
    ],
)
def test_a_bad_metadata_file_is_a_one_line_error(tmp_path, spoil, message):
    image_folder(tmp_path / "folder")
    spoil(tmp_path / "folder")
    with pytest.raises(DiffmemError, match=message) as error:
        read_training_data(tmp_path / "folder")
    assert "\n" not in str(error.value)


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def test_webdataset_shards_are_read_and_bad_samples_counted(tmp_path):
    arrays = [pixels(i) for i in range(4)]
    write_shard(
        tmp_path / "shards" / "00000.tar",
        {"./a.png": png(arrays[0]), "./a.txt": b"first", "b.jpg": png(arrays[1]), "b.txt": b"second"},
    )
    write_shard(
        tmp_path / "shards" / "00001.tar",
        {
            "deep/c.png": png(arrays[2]),
            "deep/c.txt": "caf\u00e9".encode(),
            "lonely.png": png(arrays[3]),
            "orphan.txt": b"no image",
            "broken.png": b"not a png",
            "broken.txt": b"broken",
            "latin.png": png(arrays[3]),
            "latin.txt": b"caf\xe9",
        },
    )
    (tmp_path / "shards" / "00002.tar").write_bytes(b"not a tar" * 100)
    data = read_training_data(tmp_path / "shards")
    assert [row.key for row in data.rows] == ["00000.tar/a", "00000.tar/b", "00001.tar/deep/c"]
    assert [row.caption for row in data.rows] == ["first", "second", "caf\u00e9"]
    for row, array in zip(data.rows, arrays[:3], strict=True):
        assert np.array_equal(as_array(row.load()), array)
    assert data.report.to_dict()["bad"] == {
        "caption not UTF-8": 1,
        "caption without image": 1,
        "image without caption": 1,
        "unreadable image": 1,
        "unreadable shard": 1,
    }
    assert data.report.rows == 8 and data.report.examples["caption without image"] == ["00001.tar/orphan"]
    one = read_training_data(tmp_path / "shards" / "00000.tar")
    assert [row.caption for row in one.rows] == ["first", "second"]


def image_dataset(rows: list[tuple[np.ndarray, str]]):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    columns = {"image": [Image.fromarray(a) for a, _ in rows], "text": [t for _, t in rows]}
    return datasets.Dataset.from_dict(columns, features=features)


def test_a_saved_datasets_dataset_is_read_by_split(tmp_path):
    import datasets

    arrays = [pixels(i) for i in range(3)]
    dataset = image_dataset([(arrays[0], "zero"), (arrays[1], ""), (arrays[2], "two")])
    dataset.save_to_disk(str(tmp_path / "single"))
    data = read_training_data(tmp_path / "single")
    assert [(row.key, row.caption) for row in data.rows] == [("0", "zero"), ("2", "two")]
    assert np.array_equal(as_array(data.rows[1].load()), arrays[2])
    assert data.report.to_dict()["bad"] == {"empty caption": 1} and data.report.rows == 3

    splits = datasets.DatasetDict({"train": dataset, "test": image_dataset([(arrays[1], "held out")])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert len(read_training_data(tmp_path / "splits").rows) == 2
    assert [row.caption for row in read_training_data(tmp_path / "splits", split="test").rows] == ["held out"]
    with pytest.raises(DiffmemError, match=r"has no split 'validation' \(it has train, test\)"):
        read_training_data(tmp_path / "splits", split="validation")

    datasets.Dataset.from_dict({"text": ["no image"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DiffmemError, match=r"has no Image column \(it has text\)"):
        read_training_data(tmp_path / "plain")


def test_a_hub_dataset_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """A cache as an earlier ``load_dataset("me/tiny")`` leaves it: the prepared Arrow files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    image_dataset([(pixels(0), "cached")]).to_parquet(str(tmp_path / "train.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")})
    prepared = next(p for p in (tmp_path / "cache").glob("parquet/*/*/*") if p.is_dir())
    shutil.copytree(prepared, tmp_path / "cache" / "me___tiny" / "default" / "0.0.0" / prepared.name)
    for arrow in (tmp_path / "cache" / "me___tiny").rglob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", "tiny-")))
    data = read_training_data("me/tiny")
    assert [row.caption for row in data.rows] == [
        "cached"
    ] and data.description == "Hub dataset me/tiny (cached)"
    with pytest.raises(DiffmemError, match="neither a folder nor a dataset in the local Hugging Face cache"):
        read_training_data("me/absent")


def test_preprocess_resizes_the_shorter_side_then_crops_and_flips():
    columns = np.repeat(np.arange(40, dtype=np.uint8)[None, :, None] * 6, 20, axis=0).repeat(3, axis=2)
    image = Image.fromarray(columns)  # 40 wide, 20 high; the red channel counts columns
    centre = preprocess(image, 10)
    assert centre.shape == (3, 10, 10) and centre.dtype == torch.float32
    assert -1 <= centre.min() and centre.max() <= 1
    resized = np.asarray(image.resize((20, 10), Image.BILINEAR))
    expected = torch.from_numpy(resized[:, 5:15].copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.equal(centre, expected)
    assert torch.equal(preprocess(image, 10, random_flip=False), centre)

    crops = {
        preprocess(image, 10, center_crop=False, generator=np.random.default_rng(seed))[0, 0, 0].item()
        for seed in range(12)
    }
    assert len(crops) > 3  # random crops start at different columns
    flips = [preprocess(image, 10, random_flip=True, generator=np.random.default_rng(s)) for s in range(12)]
    flipped = [f for f in flips if not torch.equal(f, centre)]
    assert 0 < len(flipped) < 12 and all(torch.equal(f, centre.flip(-1)) for f in flipped)
    tall = preprocess(Image.fromarray(pixels(0, 6, 30)), 12)
    assert tall.shape == (3, 12, 12)


def test_lab_export_reads_back_as_the_same_captions_and_pixels(micro_lab_data, tmp_path, capsys):
    out = tmp_path / "exported"
    assert run(["lab", "export", str(micro_lab_data), str(out)]) == 0
    lab = load_lab_dataset(micro_lab_data)
    printed = capsys.readouterr().out
    assert (
        f"wrote {lab.train.num_rows} rows of {len(lab.unique_train_images()[0])} images to {out}" in printed
    )
    assert not (out / "config.json").exists() and (out / "lab_config.json").is_file()

    data = read_training_data(out)
    assert data.report.to_dict()["bad"] == {} and data.report.caption_column == "text"
    assert [row.caption for row in data.rows] == lab.train.column("caption").to_pylist()
    direct = read_training_data(micro_lab_data)  # the lab dataset itself reads as the same rows
    assert [(r.key, r.caption) for r in direct.rows] == [(r.key, r.caption) for r in data.rows]
    scene_of = dict(
        zip(lab.train.column("image").to_pylist(), lab.train.column("scene_id").to_pylist(), strict=True)
    )
    for row in data.unique_images():
        assert np.array_equal(as_array(row.load()), lab.scene_image(scene_of[row.key]))
    metadata = pq.read_table(out / "metadata.parquet")
    for column in ("scene_id", "group", "trigger_words", "row_id"):
        assert metadata.column(column).to_pylist() == lab.train.column(column).to_pylist()

    assert run(["lab", "export", str(micro_lab_data), str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_index_build_reads_shards_and_saves_the_report(tmp_path, capsys):
    arrays = [pixels(i, 8, 8) for i in range(3)]
    members = {f"{i}.png": png(a) for i, a in enumerate(arrays)} | {"0.txt": b"zero", "1.txt": b"one"}
    write_shard(tmp_path / "shards" / "0.tar", members | {"2.caption": b"two"})
    assert run(["index", "build", str(tmp_path / "shards"), "--out", str(tmp_path / "index")]) == 0
    printed = capsys.readouterr().out
    # an index holds every training image, captioned or not
    assert "3 of 3 rows usable, captions from 'txt' (1 without a caption, kept)" in printed
    report = json.loads((tmp_path / "index" / "data_report.json").read_text())
    assert report["bad"] == {} and report["uncaptioned"] == 1
    index = TrainingSetIndex.load(tmp_path / "index")
    assert index.captions == ["zero", "one", ""] and index.ids == [0, 1, 2]
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(index.vectors(torch.arange(3)), expected)

    args = ["index", "build", str(tmp_path / "shards"), "--caption-column", "caption"]
    assert run([*args, "--out", str(tmp_path / "by-extension")]) == 0
    assert TrainingSetIndex.load(tmp_path / "by-extension").captions == ["", "", "two"]


def test_the_copy_detector_trains_on_an_image_folder(tmp_path, capsys):
    image_folder(tmp_path / "folder", n=4, kind="csv")
    args = ["lab", "copy-detector", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "enc")]
    assert run([*args, "--steps", "2", "--batch-size", "4", "--input-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 rows usable" in printed and "of 4 edited copies matched" in printed
    assert json.loads((tmp_path / "enc" / "data_report.json").read_text())["usable"] == 4
    assert json.loads((tmp_path / "enc" / "training.json").read_text())["steps"] == 2
