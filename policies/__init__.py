"""Policy engine (arrives with issue 5)."""
