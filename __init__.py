"""optd: an adaptive optimization control-plane daemon for LLM inference."""

__version__ = "0.1.0"
