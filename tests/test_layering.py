"""The import rules between layers, read from the source with ``ast`` so they cannot drift.

Each rule names the modules it covers (a package or a module, by prefix), the prefixes they may
not import (less the imports it allows under them), and the modules under that prefix it leaves to
a rule of their own. Imports under
``if TYPE_CHECKING:`` count too: the rules are about what a module knows of, not only what it loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import appliance

PACKAGE_ROOT = Path(appliance.__file__).parent

ENGINE_SERVICES = ("appliance.engine.router", "appliance.engine.service")
ENGINE_IMPLEMENTATIONS = ("appliance.engine.pool", "appliance.engine.batcher", "appliance.engine.llama")


@dataclass(frozen=True)
class Rule:
    modules: str
    forbidden: tuple[str, ...]
    why: str
    except_modules: tuple[str, ...] = ()
    except_imports: tuple[str, ...] = ()


RULES = [
    Rule(
        "appliance.engine",
        (
            "appliance.models",
            "appliance.store",
            "appliance.provision",
            "appliance.web",
            "appliance.audit",
            "appliance.runtime",
        ),
        "the engine loads from a LoadSpec: a worker with an engine and a cache but no registry runs it",
        except_modules=ENGINE_SERVICES,
    ),
    Rule(
        "appliance.engine.router",
        ("appliance.web", "appliance.runtime", "appliance.provision", *ENGINE_IMPLEMENTATIONS),
        "the router resolves names for any Engine; the runtime picks the implementation",
    ),
    Rule(
        "appliance.engine.router",
        ("appliance.cluster",),
        "the router picks among workers through its NodeDirectory protocol and the pure placement",
        except_imports=("appliance.cluster.placement",),
    ),
    Rule(
        "appliance.engine.service",
        ("appliance.web", "appliance.runtime", "appliance.provision", *ENGINE_IMPLEMENTATIONS),
        "inference goes through the router and the Engine protocol",
    ),
    *(
        Rule(
            module,
            ("appliance.egress",),
            "routing and inference know providers by their types; only the egress component calls them",
            except_imports=("appliance.egress.types",),
        )
        for module in (*ENGINE_SERVICES, "appliance.engine.routing", "appliance.engine.external")
    ),
    Rule(
        "appliance.egress",
        (
            "appliance.engine.router",
            "appliance.engine.routing",
            "appliance.engine.service",
            "appliance.engine.external",
            "appliance.web",
            "appliance.runtime",
            "appliance.cli",
            "appliance.tasks",
            "appliance.cluster",
        ),
        "the egress component calls providers for whoever asks; routing and the services sit above it",
    ),
    Rule(
        "appliance.models",
        ("appliance.engine", "appliance.web", "appliance.runtime"),
        "the registry is a service below the engine's router and the web layer",
    ),
    Rule(
        "appliance.bundles",
        ("appliance.engine", "appliance.web", "appliance.runtime", "appliance.cli"),
        "bundles are a service: the CLI and the web layer call it, never the other way round",
    ),
    Rule(
        "appliance.auth",
        ("appliance.engine", "appliance.web", "appliance.runtime", "appliance.cli"),
        "accounts and policy are a service: the web layer and the CLI ask it, never the other way round",
    ),
    Rule(
        "appliance.tasks",
        ("appliance.web", "appliance.store", "appliance.runtime", "appliance.cli", *ENGINE_IMPLEMENTATIONS),
        "the sandbox runs a job and reports it: the task service (and the forwarder, which audits each"
        " call a job makes) keeps state above it",
        except_modules=(
            "appliance.tasks.service",
            "appliance.tasks.remote",
            "appliance.tasks.records",
            "appliance.tasks.forwarder",
        ),
    ),
    *(
        Rule(
            module,
            ("appliance.web", "appliance.runtime", "appliance.cli", "appliance.engine"),
            "the task service's parts keep tasks in the store; they know no web layer and no engine",
        )
        for module in ("appliance.tasks.remote", "appliance.tasks.records")
    ),
    Rule(
        "appliance.tasks.service",
        ("appliance.web", "appliance.runtime", "appliance.cli", *ENGINE_IMPLEMENTATIONS),
        "the task service keeps tasks in the store and answers prompts through the inference service",
    ),
    Rule(
        "appliance.cluster",
        ("appliance.web", "appliance.runtime", "appliance.cli"),
        "the cluster is a service (and a worker's loops): the web layer and the CLI call it, never the"
        " other way round",
    ),
    *(
        Rule(
            module,
            (
                "appliance.models",
                "appliance.store.base",
                "appliance.store.sqlite",
                "appliance.store.postgres",
                "appliance.audit",
                "appliance.auth",
                "appliance.provision.service",
                "appliance.cluster.service",
                "appliance.cluster.channel",
            ),
            "a worker runs on an engine and a blob cache of its own, with no registry, store or accounts",
        )
        for module in (
            "appliance.cluster.agent",
            "appliance.cluster.fetch",
            "appliance.cluster.join",
            "appliance.cluster.tasks",
        )
    ),
    Rule(
        "appliance.cluster.tasks",
        ("appliance.store", "appliance.tasks.service", "appliance.models", *ENGINE_IMPLEMENTATIONS),
        "a worker runs the server's tasks with its sandbox alone: the tasks' state stays on the server",
    ),
    Rule(
        "appliance.web",
        ("appliance.store",),
        "the web layer reaches data through the services, never the store or the cache",
    ),
    Rule(
        "appliance.web",
        ENGINE_IMPLEMENTATIONS,
        "the web layer serves through the engine's services; importing llama.cpp would slow every start",
    ),
    Rule(
        "appliance.mcp",
        ("appliance.web", "appliance.cli", "appliance.client", "appliance.store", *ENGINE_IMPLEMENTATIONS),
        "the gateway is a service the web layer mounts: its tools call the services, never HTTP or the store",
        except_imports=("appliance.store.base",),
    ),
    Rule(
        "appliance.identity",
        ("appliance",),
        "identity sits below everything, so every layer may use it",
    ),
    Rule(
        "appliance.bridge",
        ("appliance",),
        "the thread bridge sits below everything, so every layer may use it",
    ),
]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> Iterator[tuple[int, list[str]]]:
    """(line, names) per import statement; ``from x import y`` names x, then x.y (y may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _covered(rule: Rule, module: str) -> bool:
    def under(prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return under(rule.modules) and not any(under(excepted) for excepted in rule.except_modules)


def _matches(imported: str, prefix: str) -> bool:
    return imported == prefix or imported.startswith(prefix + ".")


def violations(root: Path, rules: list[Rule]) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        for rule in rules:
            if not _covered(rule, module):
                continue
            for line, names in _imports(path, module):
                offending = [
                    name
                    for name in names
                    if any(_matches(name, p) for p in rule.forbidden)
                    and not any(_matches(name, p) for p in rule.except_imports)
                ]
                if offending:
                    where = path.relative_to(root.parent)
                    found.append(f"{where}:{line}: {module} imports {offending[0]} ({rule.why})")
    return sorted(set(found))


def test_every_module_follows_the_import_rules() -> None:
    found = violations(PACKAGE_ROOT, RULES)
    assert not found, "imports that break the layering:\n" + "\n".join(found)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.modules)
def test_every_rule_covers_a_module(rule: Rule) -> None:
    modules = [_module_name(path, PACKAGE_ROOT) for path in PACKAGE_ROOT.rglob("*.py")]
    assert any(_covered(rule, module) for module in modules), f"{rule.modules}: the rule checks nothing"


@pytest.mark.parametrize(
    ("module_path", "source", "offending"),
    [
        ("engine/pool.py", "from appliance.models.service import ModelService\n", "appliance.models.service"),
        ("engine/pool.py", "from ..store import cache\n", "appliance.store"),
        ("engine/batcher.py", "import appliance.web.app\n", "appliance.web.app"),
        ("engine/service.py", "from appliance.engine.pool import EnginePool\n", "appliance.engine.pool"),
        ("models/formats.py", "from appliance.engine import llama\n", "appliance.engine"),
        ("web/handler.py", "from appliance.store.cache import BlobCache\n", "appliance.store.cache"),
        ("bridge.py", "from appliance.errors import ApplianceError\n", "appliance.errors"),
        (
            "engine/router.py",
            "from appliance.cluster.remote import RemoteEngine\n",
            "appliance.cluster.remote",
        ),
        ("cluster/directory.py", "from appliance.runtime import Runtime\n", "appliance.runtime"),
        ("engine/router.py", "from appliance.egress.client import Egress\n", "appliance.egress.client"),
        ("egress/client.py", "from appliance.engine.router import Router\n", "appliance.engine.router"),
    ],
)
def test_a_forbidden_import_is_reported_with_its_place(
    tmp_path: Path, module_path: str, source: str, offending: str
) -> None:
    root = tmp_path / "appliance"
    target = root / module_path
    target.parent.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (target.parent / "__init__.py").write_text("")
    target.write_text('"""A module."""\n\n' + source)
    found = violations(root, RULES)
    assert len(found) == 1
    assert found[0].startswith(f"appliance/{module_path}:3: ")
    assert f"imports {offending} (" in found[0]


def test_the_router_and_the_inference_service_may_use_the_registry(tmp_path: Path) -> None:
    root = tmp_path / "appliance"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "router.py").write_text("from appliance.models.service import ModelService\n")
    assert violations(root, RULES) == []


def test_the_router_may_use_the_pure_placement(tmp_path: Path) -> None:
    root = tmp_path / "appliance"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "router.py").write_text("from appliance.cluster.placement import Candidate, place\n")
    assert violations(root, RULES) == []
