"""`optd top`: the Textual dashboard. It watches the control loop and lets an operator override it.

It talks to the daemon only over HTTP (DESIGN.md: `tui → (HTTP API only)`); nothing here imports
optd.daemon. Modules: `token` (where the control token is), `client` (httpx + the SSE stream),
`sse` (the event-stream parser), `source` (what the app reads from), `feed` (reconnect loop with
backoff), `models` (the API's JSON), `state` (what the screen shows, kept up to date), `fmt` (numbers
for people), `limits` (what a pin may ask of a knob), `widgets/`, `screens/`, `app`, `main`.
`fleet/` is `optd top --mqtt`: every node on an MQTT broker in one view (it reads MQTT, and HTTP only to
open one node's dashboard).
"""
