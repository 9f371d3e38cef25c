"""`?` in the fleet view."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from optd.tui.screens.help import HelpScreen

HELP = """\
[b]optd top --mqtt[/b] — every node under the topic prefix, as its MQTT bridge reports it

[b]↑↓[/b]     move between nodes
[b]enter[/b]  open the node: its own dashboard over HTTP when its `knobs` message names its URL
        (q there comes back here), else its detail view from MQTT
[b]d[/b]      the node's detail view from MQTT: knobs and pins, latest telemetry, decisions
[b]p[/b]      pause automation on every node     [b]r[/b]  resume it on every node
[b]s[/b]      switch every node's policy (a preset or a name the nodes know)
        Fleet commands go to <prefix>/all/cmd/set after a confirmation, HMAC-signed with
        --hmac-secret; each node's answer shows below the table (nodes need mqtt.commands on)
[b]?[/b]      this help      [b]q[/b]  quit

Columns: state is the node's retained status (offline: it stopped, or the broker lost it: Last Will);
k, kv, bits, batch are the four knobs (yellow: pinned); tok/s, TTFT and ITL p95, quality top-1 and KL
are its latest telemetry sample; seen is how long ago it last sent anything.
Press any key to close."""


class FleetHelpScreen(HelpScreen):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)
