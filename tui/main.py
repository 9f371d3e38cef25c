"""`optd top`: find the token, connect, run the dashboard. Exit codes as the CLI's: 0 ok, 2 bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

from optd.tui.app import DashboardApp
from optd.tui.client import DaemonClient, check_url
from optd.tui.token import find_token


async def _run(url: str, token: str | None) -> None:
    client = DaemonClient(url, token)
    try:
        await DashboardApp(client).run_async()
    finally:
        await client.aclose()


def run(url: str, token: str | None = None, state_dir: Path | None = None) -> int:
    # Bad input (a broken token file, a malformed URL) raises ValueError before the screen opens.
    token = find_token(token, state_dir)
    check_url(url)
    asyncio.run(_run(url, token))
    return 0
