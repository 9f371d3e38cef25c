"""`optd top --mqtt URL`: connect to the broker, show the fleet; a node opened with a known HTTP URL gets
the single-node dashboard (optd.tui.app), and quitting that comes back to the fleet, whose MQTT link kept
running meanwhile. Exit codes as the CLI's: 0 ok, 2 bad input (ValueError before the screen opens)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from optd.tui.app import DashboardApp
from optd.tui.client import DaemonClient
from optd.tui.fleet.app import FleetApp
from optd.tui.fleet.broker import check_prefix, parse_broker
from optd.tui.fleet.link import FleetLink
from optd.tui.fleet.state import FleetState
from optd.tui.token import find_token

DEFAULT_PREFIX = "optd/v1"
# The daemon's own variable for mqtt.hmac_secret: a secret is better kept out of the command line
HMAC_ENV = "OPTD_MQTT__HMAC_SECRET"


async def fleet_loop(link: FleetLink, token: str | None) -> None:
    select = None
    link.start()
    try:
        while True:
            drill = await FleetApp(link, select=select).run_async()
            if drill is None:
                return
            select = drill.node
            client = DaemonClient(drill.url, token)
            try:
                await DashboardApp(client).run_async()
            finally:
                await client.aclose()
    finally:
        await link.stop()


def hmac_secret(given: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    secret = given if given is not None else environ.get(HMAC_ENV)
    if secret is not None and not secret.strip():
        raise ValueError(f"--hmac-secret: the secret is empty ({'given' if given is not None else HMAC_ENV})")
    return secret


def run(mqtt_url: str, prefix: str = DEFAULT_PREFIX, token: str | None = None, state_dir: Path | None = None,
        secret: str | None = None) -> int:
    broker = parse_broker(mqtt_url)
    prefix = check_prefix(prefix)
    token = find_token(token, state_dir)        # for the nodes' HTTP APIs, when one is opened
    link = FleetLink(broker, prefix, FleetState(broker.label, prefix), hmac_secret=hmac_secret(secret))
    asyncio.run(fleet_loop(link, token))
    return 0
