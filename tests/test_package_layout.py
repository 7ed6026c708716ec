"""The package's layout rules (issue 11): checked on the source, so a new module cannot break them quietly."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rmkit"
MODULES = sorted(ROOT.rglob("*.py"))


def _module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path):
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])


def _absolute(node, path):
    """The absolute module an ``ImportFrom`` names."""
    if node.level == 0:
        return node.module or ""
    base = _package_of(path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted):
    base = ROOT.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def private_cross_module_uses(path, text=None):
    """``(line, what)`` for each private name this module takes from another rmkit module.

    Allowed: a package importing its own private submodules (``from . import _shards``,
    ``from ._api import save``). Refused: importing a private *name* from another
    module, or reading ``module._name`` off an imported rmkit module.
    """
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text)
    own_package = _package_of(path) if path.name != "__init__.py" else _module_name(path)
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, path)
            if not (source == "rmkit" or source.startswith("rmkit.")):
                continue
            for alias in node.names:
                is_submodule = _is_module(f"{source}.{alias.name}")
                if not _private(alias.name):
                    if is_submodule:
                        module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    continue
                if is_submodule:
                    module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    if source == own_package:
                        continue
                found.append((node.lineno, f"from {source} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rmkit"):
                    module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases):
            target = module_aliases[node.value.id]
            if target.rsplit(".", 1)[0] != own_package or not target.rsplit(".", 1)[-1].startswith("_"):
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_cross_module_uses(path) == []


def test_the_rule_catches_private_imports_and_attributes():
    path = ROOT / "objectives" / "_gating.py"
    text = path.read_text(encoding="utf-8")
    n = text.count("\n")
    bad = text + "from rmkit.backbones._loading import _LOADED\nfrom rmkit.backbones import _loading\n_loading._LOADED\n"
    assert private_cross_module_uses(path, bad) == [
        (n + 1, "from rmkit.backbones._loading import _LOADED"), (n + 2, "from rmkit.backbones import _loading"),
        (n + 3, "_loading._LOADED")]


def test_every_subpackage_has_a_public_init_and_private_modules():
    packages = sorted({p.parent for p in MODULES if p.parent != ROOT})
    for package in packages:
        init = package / "__init__.py"
        assert init.exists(), f"{package} has no __init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{init} has no docstring saying what the package holds"
        for module in package.glob("*.py"):
            assert module.name == "__init__.py" or module.name.startswith("_"), (
                f"{module}: implementation files are private (_name.py); the package's __init__ is its public face")


def test_top_level_names_come_from_subpackages_and_import_no_torch():
    code = ("import sys, rmkit; assert 'torch' not in sys.modules; "
            "import rmkit.model_selection, rmkit.layout, rmkit.metrics; assert 'torch' not in sys.modules; "
            "print(sorted({getattr(rmkit, n).__module__.split('.')[1] for n in rmkit.__all__ if hasattr(getattr(rmkit, n), '__module__')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["backbones", "ensemble", "judge", "lora", "moe", "objectives", "persistence"]


def test_a_save_naming_the_old_flat_modules_still_loads(tmp_path):
    """Saves written by rmkit 0.1 name classes by their flat modules (rmkit._decorrelation...)."""
    import numpy as np

    import rmkit
    from rmkit.persistence import UnsafeClassError
    from rmkit.persistence._allowlist import MOVED_CLASSES

    rng = np.random.default_rng(0)
    R = rng.normal(size=(50, 3))
    model = rmkit.VerbosityDecorrelator(verbosity=-1).fit(R)
    path = rmkit.save(model, tmp_path / "m")
    manifest_path = path / "rmkit.json"
    text = manifest_path.read_text()
    new_to_old = {new: old for old, new in MOVED_CLASSES.items()}
    assert "rmkit.objectives._decorrelation.VerbosityDecorrelator" in text
    for new, old in new_to_old.items():
        text = text.replace(f'"{new}"', f'"{old}"')
    assert '"rmkit._decorrelation.VerbosityDecorrelator"' in text
    manifest_path.write_text(text)
    np.testing.assert_array_equal(rmkit.load(path).transform(R), model.transform(R))
    # the table maps known names only: an old-looking name it does not list is still refused
    manifest_path.write_text(text.replace("rmkit._decorrelation.VerbosityDecorrelator", "rmkit._decorrelation.Nope"))
    with pytest.raises(UnsafeClassError, match="Nope"):
        rmkit.load(path)
