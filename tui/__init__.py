"""Textual dashboard (arrives with issue 6)."""
