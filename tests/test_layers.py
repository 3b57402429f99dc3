"""The package's layers, checked by reading every module's imports.

The rules (docs/index.md, "Architecture"):

- ``cache_router.core`` (tree, registry, policies, routing key, request, errors, events,
  retry) imports only ``core``, the standard library and the optional JSON parsers
  ``orjson`` and ``msgspec``. So no starlette, httpx, aiohttp, uvicorn, h11, httptools or
  anyio: the routing core does no I/O and knows nothing about HTTP.
- ``cache_router.proxy`` imports ``core`` and ``proxy``.
- ``cache_router.ops`` imports ``core``, ``proxy`` and ``ops``, never ``proxy.relay`` or
  ``proxy.exchange`` (the relay and its exchanges are the request path; operations talk
  to it only through events and the registry).
- The top level (``config``, ``builder``, ``cli``, ``demo``, ``serve``, ``__init__``,
  ``__main__``, anything not in a layer's folder) may import anything.
- ``cache_router.testing`` may import anything; nothing in ``core``, ``proxy`` or ``ops``
  imports it.

Every ``import`` and ``from ... import`` counts, wherever it is (module level, inside a
function, under ``TYPE_CHECKING``), as do relative imports and ``importlib.import_module``
calls with a literal name. ``from cache_router import x`` depends on the module
``cache_router.x`` when there is one, and on the package's ``__init__`` (the top level)
otherwise.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "cache_router"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Lower layers first; a module may import its own layer and the ones before it.
RANK = {"core": 0, "proxy": 1, "ops": 2, "top": 3}

#: The request path, which ops may not import.
RELAY = (f"{PACKAGE}.proxy.relay", f"{PACKAGE}.proxy.exchange")

#: What the routing core may import besides itself and the standard library.
CORE_THIRD_PARTY = frozenset({"orjson", "msgspec"})

#: Imports that break a rule but are known and being removed. Each entry is
#: (importing module, imported module). The lead empties this at merge.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """``core``/``proxy``/``ops``/``testing``/``top`` for a package module; None outside."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) > 1 and parts[1] in ("core", "proxy", "ops", "testing"):
        return parts[1]
    return "top"


def is_module(name: str, root: Path) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file at ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                inside = candidate.startswith(f"{PACKAGE}.")
                yield node.lineno, candidate if inside and is_module(candidate, root) else source
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def rule_broken(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None when it may."""
    source, target = layer_of(importer), layer_of(imported)
    if source is None or source == "testing":
        return None
    if target is None:
        top = imported.split(".")[0]
        if source == "core" and top not in sys.stdlib_module_names | CORE_THIRD_PARTY:
            return f"core imports only the standard library, core, orjson and msgspec, not {top}"
        return None
    if target == "testing":
        return None if source == "top" else f"{source} may not import cache_router.testing"
    if RANK[target] > RANK[source]:
        return f"{source} may not import from the {target} layer above it"
    if source == "ops" and any(
        imported == relay or imported.startswith(f"{relay}.") for relay in RELAY
    ):
        return "ops may not import the relay (cache_router.proxy.relay, .exchange)"
    return None


def violations(root: Path) -> list[str]:
    """Every import under ``root`` that breaks a rule, as ``module:line imports x (why)``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for line, imported in imported_modules(path, root):
            why = rule_broken(importer, imported)
            if why is not None and (importer, imported) not in KNOWN_VIOLATIONS:
                found.append(f"{importer}:{line} imports {imported} ({why})")
    return found


def test_no_module_imports_from_a_layer_above_it() -> None:
    assert ROOT.is_dir()
    assert violations(ROOT) == []


def test_known_violations_still_exist() -> None:
    """An entry in KNOWN_VIOLATIONS that no longer happens must be deleted."""
    seen = {
        (module_name(path, ROOT), imported)
        for path in ROOT.rglob("*.py")
        for _, imported in imported_modules(path, ROOT)
    }
    assert not KNOWN_VIOLATIONS - seen, f"remove from KNOWN_VIOLATIONS: {KNOWN_VIOLATIONS - seen}"


def test_every_layer_has_modules() -> None:
    """The walk sees the real package (a wrong ROOT would pass the test above vacuously)."""
    layers = {layer_of(module_name(path, ROOT)) for path in ROOT.rglob("*.py")}
    assert layers == {"core", "proxy", "ops", "testing", "top"}


# -- the checker itself catches each kind of violation ------------------------------------


def fake_package(tmp_path: Path, module: str, source: str) -> Path:
    """A package laid out like cache_router, empty but for ``module`` holding ``source``."""
    root = tmp_path / PACKAGE
    for folder in ("", "core", "proxy", "ops", "testing"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    for name in ("builder.py", "config.py", "demo.py", "core/registry.py", "ops/health.py"):
        (root / name).write_text("")
    for name in ("proxy/relay.py", "proxy/asgi.py"):
        (root / name).write_text("")
    (root / module).write_text(source)
    return root


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("core/tree.py", "from cache_router.proxy.asgi import Scope\n", "proxy.asgi"),
        ("core/tree.py", "import starlette.requests\n", "not starlette"),
        ("core/tree.py", "import httpx\n", "not httpx"),
        ("core/tree.py", "def f():\n    import aiohttp\n", "not aiohttp"),
        ("core/tree.py", "from uvicorn.config import Config\n", "not uvicorn"),
        ("core/tree.py", "import anyio\n", "not anyio"),
        ("core/tree.py", "from cache_router import RoutingRequest\n", "cache_router ("),
        ("core/tree.py", "from cache_router import builder\n", "cache_router.builder"),
        ("core/tree.py", "from .. import proxy\n", "cache_router.proxy ("),
        ("proxy/relay.py", "from cache_router.ops.health import X\n", "ops.health"),
        ("proxy/relay.py", "from cache_router.config import RouterConfig\n", "config"),
        ("ops/health.py", "from cache_router.builder import build_router\n", "builder"),
        ("ops/fleet.py", "from cache_router.proxy.relay import send\n", "the relay"),
        ("ops/health.py", "from ..proxy import relay\n", "the relay"),
        ("ops/health.py", "from cache_router.proxy.exchange import Collection\n", "the relay"),
        ("ops/health.py", "from cache_router.testing import serve_app\n", "testing"),
        (
            "ops/health.py",
            "if TYPE_CHECKING:\n    from cache_router.demo import DemoConfig\n",
            "demo",
        ),
        (
            "proxy/clients.py",
            "import importlib\nimportlib.import_module('cache_router.ops.metrics')\n",
            "ops.metrics",
        ),
    ],
)
def test_the_check_names_a_violation(
    tmp_path: Path, module: str, source: str, expected: str
) -> None:
    root = fake_package(tmp_path, module, source)
    found = violations(root)
    assert len(found) == 1, found
    assert found[0].startswith(module_name(root / module, root) + ":")
    assert expected in found[0]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("core/tree.py", "import heapq\nfrom .registry import Worker\nimport orjson\n"),
        ("proxy/relay.py", "from cache_router.core.registry import Lease\nimport httpx\n"),
        ("ops/health.py", "from cache_router.proxy.asgi import Scope\nimport anyio\n"),
        ("ops/health.py", "from cache_router.proxy import asgi\n"),
        ("builder.py", "from cache_router.proxy.relay import TransportChoice\n"),
        ("demo.py", "from cache_router.testing import serve_app\n"),
        ("testing/server.py", "from cache_router.builder import build_router\n"),
    ],
)
def test_the_check_allows_the_right_way(tmp_path: Path, module: str, source: str) -> None:
    root = fake_package(tmp_path, module, source)
    assert violations(root) == []
