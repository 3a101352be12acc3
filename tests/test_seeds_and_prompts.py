import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.errors import DiffmemError
from diffmem.io.prompts import read_prompt_records, read_prompts
from diffmem.sampling import generation_seed


def test_generation_seeds_are_stable_and_distinct():
    seeds = {generation_seed(0, p, g) for p in range(50) for g in range(8)}
    assert len(seeds) == 400
    assert generation_seed(0, 3, 1) == generation_seed(0, 3, 1) != generation_seed(1, 3, 1)
    with pytest.raises(DiffmemError, match="non-negative"):
        generation_seed(0, -1, 0)


PROMPTS = ["a red sneaker", 'a "quoted", comma bag']


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_read_prompts_from_every_format(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join([PROMPTS[0], "", PROMPTS[1]]) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"caption": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    elif suffix == ".csv":
        path.write_text('caption,id\na red sneaker,0\n"a ""quoted"", comma bag",1\n')
    else:
        pq.write_table(pa.table({"caption": PROMPTS}), path)
    column = "prompt" if suffix == ".txt" else "caption"
    assert read_prompts(path, column) == PROMPTS


def test_read_prompts_errors(tmp_path):
    with pytest.raises(DiffmemError, match="prompt file not found"):
        read_prompts(tmp_path / "absent.txt")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DiffmemError, match="unsupported prompt file"):
        read_prompts(tmp_path / "p.xlsx")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DiffmemError, match="has no column 'prompt'; columns: text"):
        read_prompts(tmp_path / "p.parquet")


def test_prompt_records_keep_every_row_with_its_status(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red sneaker\n\n  \nbad \xff byte\n \t\nlast\n")
    records = read_prompt_records(path)
    assert [(r.prompt_id, r.status) for r in records] == [(0, "ok"), (3, "not_utf8"), (5, "ok")]
    assert records[1].prompt == "bad \ufffd byte"
    with pytest.raises(DiffmemError, match="prompt 3 is not-utf8"):
        read_prompts(path)

    table = tmp_path / "p.jsonl"
    table.write_text('{"id": 7, "prompt": "x"}\n{"id": 3, "prompt": ""}\n{"id": 9, "prompt": null}\n')
    records = read_prompt_records(table, id_column="id")
    assert [(r.prompt_id, r.prompt, r.status) for r in records] == [
        (7, "x", "ok"),
        (3, "", "empty"),
        (9, "", "missing"),
    ]
    table.write_text('{"id": 7, "prompt": "x"}\n{"id": 7, "prompt": "y"}\n')
    with pytest.raises(DiffmemError, match="duplicate prompt id 7"):
        read_prompt_records(table, id_column="id")
    with pytest.raises(DiffmemError, match="has no column 'key'"):
        read_prompt_records(table, id_column="key")


def test_the_noise_depends_on_the_low_32_bits_of_a_seed_as_documented():
    import torch

    from diffmem.sampling.seeds import seeded_generators

    low, high = seeded_generators([5, 5 + (1 << 40)])
    assert torch.equal(torch.randn(4, generator=low), torch.randn(4, generator=high))
