"""Which event loop runs the current task (without the sniffio package)."""

from __future__ import annotations

import asyncio

__all__ = ["on_asyncio"]


def on_asyncio() -> bool:
    """True inside a running asyncio loop (the aiohttp fast paths need one); False on trio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
