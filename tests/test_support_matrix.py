"""The support matrix in README.md and docs/models.md is what the tests' ``supports`` marks generate, and
every cell is proven by a test or listed as untested with a reason."""

import pytest

from support_matrix import (
    DOCUMENTS,
    END,
    FAMILIES,
    METHODS,
    START,
    matrix_markdown,
    read_proofs,
    replace_block,
)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_the_documents_show_the_matrix_the_tests_prove(document):
    text = document.read_text()
    assert replace_block(text, matrix_markdown(read_proofs())) == text, (
        f"{document.name} is stale: run python tests/support_matrix.py"
    )


def test_every_cell_is_proven_or_listed_as_untested():
    proofs = read_proofs()
    table = matrix_markdown(proofs).splitlines()[2 : 2 + len(FAMILIES)]
    cells = [cell.strip() for row in table for cell in row.strip("|").split("|")[1:]]
    assert len(cells) == len(FAMILIES) * len(METHODS)
    assert all(cell.startswith(("works [", "refused: ", "untested: ")) for cell in cells)
    assert {p.method for p in proofs} == set(METHODS)


def _marked(tmp_path, *marks: str) -> list:
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n"
        + "".join(f"@pytest.mark.supports({m})\n" for m in marks)
        + "def test_it():\n    pass\n"
    )
    return read_proofs(tmp_path)


def test_marks_that_disagree_or_leave_a_cell_unproven_are_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("support_matrix.ROOT", tmp_path)
    proofs = _marked(tmp_path, '"amg", "unet2d"', '"amg", "unet2d", refused="no"')
    with pytest.raises(ValueError, match="no test proves detection on stable-diffusion"):
        matrix_markdown(proofs[:1])
    untested = {(f, m): "why" for f in FAMILIES for m in METHODS}
    with pytest.raises(ValueError, match="listed as untested but proven"):
        matrix_markdown(proofs[:1], untested)
    del untested["unet2d", "amg"]
    with pytest.raises(ValueError, match="the tests of amg on unet2d disagree"):
        matrix_markdown(proofs, untested)
    assert "| `unet2d` | untested: why | untested: why | untested: why | works [1] |" in matrix_markdown(
        proofs[:1], untested
    )


@pytest.mark.parametrize(
    ("mark", "message"),
    [('"amg", "sd9"', "families among"), ('"painting", "unet2d"', "unknown method"), ("AMG", "literal")],
)
def test_malformed_marks_are_errors(tmp_path, monkeypatch, mark, message):
    monkeypatch.setattr("support_matrix.ROOT", tmp_path)
    with pytest.raises(ValueError, match=message):
        _marked(tmp_path, mark)


def test_a_block_needs_both_markers():
    assert replace_block(f"a\n{START}\nold\n{END}\nb", "new") == f"a\n{START}\nnew\n{END}\nb"
    with pytest.raises(ValueError, match="expected one"):
        replace_block(f"a\n{END}\n{START}\n", "new")
