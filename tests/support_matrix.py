"""The support matrix (model family x method) as the tests prove it, written into README.md and
docs/models.md between the support-matrix markers: ``python tests/support_matrix.py``.

A test proves a cell with ``@pytest.mark.supports(method, *families)`` when it checks that the method
gives a meaningful result on those families, or with ``refused="short reason"`` when it checks that the
method stops with a one-line ``DiffmemError`` naming the family and the reason. The marks are read from
the test files' source (literal arguments only), so the matrix is generated without importing a model;
``tests/test_support_matrix.py`` fails when a document's block differs from what the marks give.
"""

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "models.md")
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"

# the adapters' ``family`` strings, in the table's order
FAMILIES = (
    "stable-diffusion",
    "stable-diffusion-xl",
    "stable-diffusion-3",
    "pixart-alpha",
    "pixart-sigma",
    "flux-dev",
    "flux-schnell",
    "unet2d",
)
# the mark's method names and their columns
METHODS = {
    "detection": "detection (`noise_norm`, first step)",
    "explanation": "explanation (token significance)",
    "prompt-optimisation": "prompt optimisation",
    "amg": "Anti-Memorization Guidance",
    "fine-tuning": "fine-tuning with policies",
}
LEGEND = (
    "*works*: the test checks the method's result on a tiny random-weight model of the family (finite, "
    "prompt-dependent scores; a lowered norm or similarity); *refused*: the test checks the one-line "
    "`DiffmemError` naming the family and the reason; *untested*: no test yet. The proving tests "
    "(`pytest -m supports` runs them):"
)
# cells no test proves, each with the reason it has none
UNTESTED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Proof:
    """One ``supports`` mark: a test that proves a method works on (or is refused by) some families."""

    test: str  # "tests/FILE.py::FUNCTION"
    method: str
    families: tuple[str, ...]
    refused: str | None  # the short reason of a refusal; None when the method works


def read_proofs(tests: Path = TESTS) -> list[Proof]:
    """Every ``supports`` mark on a test function of ``tests/test_*.py``, in file and line order; a mark
    with a non-literal argument, an unknown method or family, or on a function pytest does not collect
    is an error."""
    proofs = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if not _is_supports(decorator):
                    continue
                where = f"{path.relative_to(ROOT).as_posix()}::{node.name}"
                if not node.name.startswith("test"):
                    raise ValueError(f"{where}: supports marks a function pytest does not collect")
                proofs.append(_proof(where, decorator))
    return proofs


def matrix_markdown(proofs: list[Proof], untested: dict[tuple[str, str], str] = UNTESTED) -> str:
    """The matrix as markdown: a table with a cell per family and method, then the numbered tests."""
    cells: dict[tuple[str, str], list[Proof]] = {}
    for proof in proofs:
        for family in proof.families:
            cells.setdefault((family, proof.method), []).append(proof)
    numbers = {test: i for i, test in enumerate(dict.fromkeys(p.test for p in proofs), start=1)}
    lines = [
        "| family | " + " | ".join(METHODS.values()) + " |",
        "| --- |" + " --- |" * len(METHODS),
    ]
    for family in FAMILIES:
        row = [
            _cell(family, method, cells.get((family, method), []), untested, numbers) for method in METHODS
        ]
        lines.append(f"| `{family}` | " + " | ".join(row) + " |")
    lines += ["", *textwrap.wrap(LEGEND, width=110, break_on_hyphens=False), ""]
    lines += [f"{n}. `{test}`" for test, n in numbers.items()]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the support-matrix markers replaced by ``block``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} block")
    before, rest = text.split(START)
    _, after = rest.split(END)
    return f"{before}{START}\n{block}\n{END}{after}"


def _is_supports(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.supports"


def _proof(where: str, mark: ast.Call) -> Proof:
    try:
        method, *families = (ast.literal_eval(a) for a in mark.args)
        keywords = {k.arg: ast.literal_eval(k.value) for k in mark.keywords}
    except ValueError as error:
        raise ValueError(f"{where}: supports takes literal arguments ({error})") from None
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; the matrix has {', '.join(METHODS)}")
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown or set(keywords) - {"refused"}:
        raise ValueError(f"{where}: supports(method, *families, refused=None) with families among {FAMILIES}")
    return Proof(where, method, tuple(families), keywords.get("refused"))


def _cell(
    family: str, method: str, proofs: list[Proof], untested: dict[tuple[str, str], str], numbers: dict
) -> str:
    if not proofs:
        if (family, method) not in untested:
            raise ValueError(f"no test proves {method} on {family}, and it is not listed as untested")
        return f"untested: {untested[family, method]}"
    if (family, method) in untested:
        raise ValueError(f"{method} on {family} is listed as untested but proven by {proofs[0].test}")
    outcomes = {p.refused for p in proofs}
    if len(outcomes) > 1:
        raise ValueError(f"the tests of {method} on {family} disagree: {sorted(map(str, outcomes))}")
    (refused,) = outcomes
    proven = "[" + ", ".join(str(numbers[p.test]) for p in proofs) + "]"
    return f"works {proven}" if refused is None else f"refused: {refused} {proven}"


if __name__ == "__main__":
    generated = matrix_markdown(read_proofs())
    for document in DOCUMENTS:
        document.write_text(replace_block(document.read_text(), generated))
        print(f"wrote the support matrix into {document.relative_to(ROOT)}")
