"""`optd top --mqtt URL`: the fleet view. Every node publishing under a topic prefix in one table, one
node drilled into, and fleet-wide pause, resume and policy switch with a confirmation.

It reads only MQTT (the bridge's topics, optd.daemon.mqtt's docstring) and, to drill into a node, that
node's HTTP API through the single-node dashboard; like the rest of optd.tui it imports nothing from the
daemon. Modules: `broker` (the broker URL), `messages` (the topics' JSON), `commands` (fleet commands,
HMAC-signed as the daemon checks them), `state` (what the screen shows), `link` (the MQTT connection:
subscribe, reconnect with backoff, publish), `widgets`, `confirm`, `policy`, `detail`, `help`, `app`,
`main` (switches between the fleet and a node's dashboard).
"""
