"""The optd daemon: CLI, config, HTTP API, telemetry, store."""
