"""Test and demo helpers: a simulated LLM engine and a background uvicorn runner.

Nothing here is imported by the router itself. :func:`serve_app` needs uvicorn, a test and
demo dependency that is imported only when a server is started.
"""

from cache_router.testing.engine import EngineStats, SimulatedEngine
from cache_router.testing.pd import PDFleet, PDState, serve_pd_fleet
from cache_router.testing.server import BackgroundServer, serve_app, serve_apps, wait_for_http

__all__ = [
    "BackgroundServer",
    "EngineStats",
    "PDFleet",
    "PDState",
    "SimulatedEngine",
    "serve_app",
    "serve_apps",
    "serve_pd_fleet",
    "wait_for_http",
]
