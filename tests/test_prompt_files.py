"""Prompt files as users and hostile generators write them: every row kept with a status or the whole file
refused with a one-line reason; nothing else ever escapes the readers, and no prompt that is not valid
text reaches a tokenizer as "ok"."""

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.errors import DiffmemError
from diffmem.io.prompts import encoding_problem, read_prompt_records

STATUSES = {"ok", "empty", "not_utf8", "missing"}


def read(name: str, data: bytes | None = None, table: pa.Table | None = None, **options):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        if table is not None:
            pq.write_table(table, path)
        else:
            path.write_bytes(data)
        return read_prompt_records(path, **options)


def check(records) -> None:
    assert len({r.prompt_id for r in records}) == len(records)
    for record in records:
        assert record.status in STATUSES and encoding_problem(record.prompt) is None
        assert record.status != "ok" or record.prompt.strip()


def test_undecodable_bytes_become_not_utf8_rows_in_every_format():
    jsonl = read("p.jsonl", b'{"prompt": "caf\xff"}\n{"prompt": "a red sneaker"}\n')
    csv = read("p.csv", b'prompt\n"caf\xff"\na red sneaker\n')
    parquet = read(
        "p.parquet", table=pa.table({"prompt": pa.array([b"caf\xff", b"a red sneaker"], pa.binary())})
    )
    text = read("p.txt", b"\xef\xbb\xbfcaf\xff\r\na red sneaker\r\n")
    for records in (jsonl, csv, parquet, text):
        assert [r.status for r in records] == ["not_utf8", "ok"]
        assert records[0].prompt == "caf\ufffd" and records[1].prompt == "a red sneaker"


def test_a_lone_surrogate_escape_or_a_non_text_column_is_a_clear_error():
    with pytest.raises(DiffmemError, match="could not read .*surrogate"):
        read("p.jsonl", b'{"prompt": "a \\ud800 b"}\n')
    with pytest.raises(DiffmemError, match="column 'prompt' is not text"):
        read("p.jsonl", b'{"prompt": [1, 2]}\n')


TEXT = st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
CELLS = st.none() | TEXT | st.integers() | st.floats() | st.lists(st.integers(), max_size=3)


def jsonl_files():
    line = st.one_of(
        st.dictionaries(st.sampled_from(["prompt", "id", "other"]), CELLS, max_size=3).map(json.dumps),
        st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    )
    return st.lists(line, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))


def csv_files():
    cell = st.binary(max_size=15).map(lambda b: b.replace(b",", b"").replace(b"\n", b"").replace(b'"', b""))
    rows = st.lists(st.lists(cell, min_size=1, max_size=3), max_size=5)
    return rows.map(lambda rs: b"prompt,id\n" + b"\n".join(b",".join(r) for r in rs))


FILES = st.one_of(
    st.tuples(st.just("p.txt"), st.binary(max_size=200)),
    st.tuples(st.just("p.jsonl"), jsonl_files()),
    st.tuples(st.just("p.csv"), csv_files()),
    st.tuples(st.just("p.jsonl"), st.binary(max_size=100)),
    st.tuples(st.just("p.csv"), st.binary(max_size=100)),
    st.tuples(st.just("p.parquet"), st.binary(max_size=100)),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(file=FILES, id_column=st.sampled_from([None, "id"]))
def test_generated_files_give_rows_with_a_status_or_a_diffmem_error(file, id_column):
    name, data = file
    try:
        records = read(name, data, id_column=None if name.endswith(".txt") else id_column)
    except DiffmemError as error:
        assert "\n" not in str(error)
        return
    check(records)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    cells=st.lists(st.none() | st.binary(max_size=20) | st.text(max_size=20), min_size=1, max_size=6),
    as_text=st.booleans(),
)
def test_generated_parquet_columns_give_rows_with_a_status(cells, as_text):
    values = [c.decode("utf-8", "replace") if as_text and isinstance(c, bytes) else c for c in cells]
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1:
        values = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in values]
    try:
        records = read("p.parquet", table=pa.table({"prompt": values}))
    except DiffmemError:
        return
    check(records)
    assert len(records) == len(cells)
