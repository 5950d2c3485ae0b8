"""What a reader installs gives a working kernel.

On Colab the book says `%pip install "minisgm[book] @ git+..."`: the package's dependencies
plus its `book` extra must provide every module that a chapter imports. Binder and `make`
install requirements.txt, which must pin each of those packages.
"""

import ast
import functools
import json
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
INSTALL_LINE = '%pip install "minisgm[book] @ git+https://github.com/minisgm/minisgm"'


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


@functools.lru_cache(maxsize=None)
def _installed() -> dict:
    return packages_distributions()


def _distribution(module: str) -> str:
    """The installed distribution that provides a top-level module ("sklearn" -> "scikit-learn")."""
    dists = _installed().get(module)
    assert dists, f"no installed distribution provides the module {module!r}"
    return re.sub(r"[-_.]+", "-", dists[0]).lower()


def _imports(source: str) -> set:
    """Top-level modules imported anywhere in ``source`` (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def chapter_imports() -> dict:
    """Third-party module -> chapters importing it, from every code cell of book/*.ipynb."""
    out: dict = {}
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            # IPython magics and shell escapes are not Python
            python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            for module in _imports(python):
                out.setdefault(module, set()).add(path.name)
    return {m: c for m, c in out.items() if m not in sys.stdlib_module_names and m != "minisgm"}


def package_imports() -> dict:
    """Third-party module -> modules of minisgm importing it (lazy imports included)."""
    out: dict = {}
    for path in sorted((ROOT / "minisgm").rglob("*.py")):
        for module in _imports(path.read_text(encoding="utf-8")):
            out.setdefault(module, set()).add(path.relative_to(ROOT).as_posix())
    return {m: c for m, c in out.items() if m not in sys.stdlib_module_names and m != "minisgm"}


def core() -> set:
    return {_name(r) for r in PYPROJECT["project"]["dependencies"]}


def book_extra() -> set:
    return {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["book"]}


def test_the_scans_find_imports():
    # Guards against a scan that silently finds nothing.
    assert {"torch", "matplotlib", "ipywidgets", "numpy"} <= set(chapter_imports())
    assert {"torch", "numpy"} <= set(package_imports())


def test_every_chapter_import_is_in_the_package_or_its_book_extra():
    provided = core() | book_extra()
    missing = [
        f"{module} ({_distribution(module)}, imported by {', '.join(sorted(chapters))})"
        for module, chapters in sorted(chapter_imports().items())
        if _distribution(module) not in provided
    ]
    assert not missing, f"add to pyproject.toml's `book` extra: {missing}"


def test_every_package_import_is_a_dependency():
    # `pip install minisgm` must give a working CLI: matplotlib writes the training's sample grids.
    missing = [
        f"{module} ({_distribution(module)}, imported by {', '.join(sorted(users))})"
        for module, users in sorted(package_imports().items())
        if _distribution(module) not in core()
    ]
    assert not missing, f"add to pyproject.toml's dependencies: {missing}"


def test_requirements_pin_every_dependency_and_install_the_book_extra():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    pinned = {_name(line) for line in lines if "==" in line}
    unpinned = sorted((core() | book_extra()) - pinned)
    assert not unpinned, f"requirements.txt pins no version of {unpinned}"
    assert "-e .[book]" in lines, "requirements.txt must install the package with its book extra"


def test_the_book_tells_colab_users_to_install_the_book_extra():
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    assert INSTALL_LINE in intro
    assert INSTALL_LINE in (ROOT / "README.md").read_text(encoding="utf-8").replace("\n", " ")
