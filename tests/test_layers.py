"""The layering of the package: the core never needs the demo world or its dependencies."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import sonicrec

PACKAGE = Path(sonicrec.__file__).parent
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
DEMO_DEPENDENCIES = ("music21", "pretty_midi", "tinysoundfont", "pyaudio")


def _demo_imports(tree: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(import node, the function it sits in or the module) of every import of sonicrec.demo."""
    found = []

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else scope
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            if any(n == "sonicrec.demo" or n.startswith("sonicrec.demo.") for n in names):
                found.append((child, scope))
            visit(child, inner)

    visit(tree, tree)
    return found


def test_no_core_module_imports_the_demo_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "demo":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, scope in _demo_imports(tree):
            lazy_in_cli = relative == Path("cli.py") and isinstance(scope, ast.FunctionDef)
            if not lazy_in_cli:
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, f"the core imports sonicrec.demo (the CLI may, inside a function): {offenders}"


def test_the_core_dependencies_name_no_demo_package():
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    core = " ".join(project["dependencies"]).lower()
    assert not [name for name in DEMO_DEPENDENCIES if name in core]
    extras = project["optional-dependencies"]
    assert {"music21", "pretty_midi", "tinysoundfont"} <= {d.split(">")[0] for d in extras["demo"]}
    assert any("demo" in d for d in extras["dev"] if d.startswith("sonicrec["))


def test_the_cli_and_the_library_load_no_demo_dependency():
    code = (
        "import sys\n"
        "import sonicrec.cli, sonicrec.recommend, sonicrec.train\n"
        f"print(sorted(m for m in {DEMO_DEPENDENCIES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
