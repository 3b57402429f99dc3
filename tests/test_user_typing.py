"""Users' code that mounts the router type-checks under ``mypy --strict``.

Starlette types ``add_middleware``'s factory with a ParamSpec, which a middleware whose
``app`` parameter can be passed by name does not satisfy; and configuration lists are
written as lists. Both showed up only in code outside the package, so this test checks a
user's module (and the examples) the way a user's CI would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = """
from fastapi import FastAPI

from cache_router import CacheRouterMiddleware, RouterConfig, WorkerRegistry, build_router

config = RouterConfig(worker_urls=["http://10.0.0.1:30000"], transparent_prefixes=["/inference"])
app = FastAPI()
app.add_middleware(CacheRouterMiddleware, config=config)
app.add_middleware(CacheRouterMiddleware, registry=WorkerRegistry(["http://10.0.0.2:30000"]))
router = build_router(config)
app.add_middleware(router.middleware)
"""


def test_mounting_code_and_the_examples_pass_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    user = tmp_path / "user_app.py"
    user.write_text(USER_CODE)
    examples = sorted(str(path) for path in (ROOT / "examples").glob("*.py"))
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(user),
            *examples,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
