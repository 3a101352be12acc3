import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.errors import DiffmemError
from diffmem.prompts_io import read_prompts
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
