"""The dependency direction stays true: web → services → store/cache, and nothing below imports above.

Each rule is (modules it applies to, module prefixes they must not import), checked on every
import statement of the package's source, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import appliance

PACKAGE = Path(appliance.__file__).parent

RULES: list[tuple[str, tuple[str, ...]]] = [
    # The web layer reaches data through the services, never the store or the cache.
    ("appliance.web", ("appliance.store",)),
    # Identity and the thread bridge sit below everything, so every layer may use them.
    ("appliance.identity", ("appliance.",)),
    ("appliance.bridge", ("appliance.",)),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                prefix = ".".join(package[: len(package) - node.level + 1])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _applies(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(f"{prefix}.")


@pytest.mark.parametrize(("layer", "forbidden"), RULES)
def test_no_module_imports_against_the_direction(layer: str, forbidden: tuple[str, ...]) -> None:
    modules = {name: path for name, path in _modules().items() if _applies(name, layer)}
    assert modules, f"no module is named {layer}: the rule would check nothing"
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(path, name)
        if any(target.startswith(prefix) for prefix in forbidden)
    )
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_against_the_direction(tmp_path: Path) -> None:
    source = tmp_path / "handler.py"
    source.write_text("def f():\n    from appliance.store.cache import BlobCache\n")
    assert "appliance.store.cache" in _imports(source, "appliance.web.handler")
