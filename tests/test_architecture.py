"""The package's layering, read from its source: algorithms never import the layers above them, nothing
imports the command line, and algorithms see a model only through the denoiser contract."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import diffmem

PACKAGE = Path(diffmem.__file__).parent
ALGORITHMS = (
    "adapters", "calibration", "core", "detect", "explain", "index", "metrics", "mitigate", "sampling", "text", "train",
)  # fmt: skip
ABOVE_ALGORITHMS = ("diffmem.report", "diffmem.serve", "diffmem.workflows", "diffmem.cli")


def within(name: str, *packages: str) -> bool:
    """Whether module ``name`` is one of ``packages`` or inside one."""
    return any(name == package or name.startswith(package + ".") for package in packages)


def modules(*packages: str) -> list[Path]:
    roots = [PACKAGE / name for name in packages] if packages else [PACKAGE]
    return sorted(path for root in roots for path in root.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every diffmem module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("diffmem")}


@pytest.mark.parametrize("path", modules(*ALGORITHMS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_algorithms_do_not_import_reports_pages_or_the_command_line(path):
    upward = sorted(name for name in imported(path) if within(name, *ABOVE_ALGORITHMS))
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}"


def test_nothing_outside_the_command_line_imports_it():
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    outside = [p for p in modules() if "cli" not in p.relative_to(PACKAGE).parts]
    offenders = [
        p for p in [*outside, *benchmarks.rglob("*.py")] if any(within(n, "diffmem.cli") for n in imported(p))
    ]
    assert not offenders


def reaches_into_the_pipeline(node: ast.AST) -> bool:
    """``getattr(x, "pipeline", ...)`` or ``x.pipeline``: an algorithm reading the adapter's internals."""
    if isinstance(node, ast.Attribute) and node.attr == "pipeline":
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in ("pipeline", "network")
    )


@pytest.mark.parametrize(
    "path", modules("detect", "explain", "mitigate", "sampling"), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_algorithms_see_the_model_through_the_denoiser_contract(path):
    lines = [node.lineno for node in ast.walk(ast.parse(path.read_text())) if reaches_into_the_pipeline(node)]
    assert not lines, f"{path.relative_to(PACKAGE)} reaches around the denoiser contract at lines {lines}"


def test_the_command_line_starts_without_loading_torch_or_a_model_library():
    code = (
        "import sys, typer; from diffmem.cli.main import app; typer.main.get_command(app); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'pyarrow', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_names_the_command_line_lists_are_the_registries():
    from diffmem.cli.generate import MITIGATION_NAMES
    from diffmem.cli.train import POLICY_NAMES
    from diffmem.mitigate import MITIGATIONS
    from diffmem.train.fine_tune import POLICIES

    assert MITIGATION_NAMES == tuple(MITIGATIONS) and POLICY_NAMES == tuple(POLICIES)


def test_the_command_lines_explanation_default_is_the_workflows():
    from diffmem.cli.explain import ATTRIBUTIONS, DEFAULT_ATTRIBUTION
    from diffmem.explain.token_significance import ATTRIBUTION_TARGETS
    from diffmem.workflows import explain

    assert DEFAULT_ATTRIBUTION == explain.DEFAULT_ATTRIBUTION and tuple(ATTRIBUTIONS) == ATTRIBUTION_TARGETS


def test_commands_are_thin():
    """Every command is flags into a workflow and its result printed: no function in the CLI over 40 lines."""
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules("cli")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40
    ]
    assert not long, f"commands to move into diffmem.workflows: {long}"


def test_the_package_root_holds_packages_and_the_error_type():
    """Modules live in the package that names their concept; the root keeps only ``errors.py``."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "errors.py"]
