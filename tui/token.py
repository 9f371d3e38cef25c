"""Where `optd top` finds the control token: `--token`, else `control.token` in the daemon's state directory.

The daemon writes the token there on first start (mode 0600). This repeats the daemon's small lookup on
purpose instead of importing it: the dashboard talks to the daemon only over HTTP and never imports it.
The precedence is the daemon's: `--state-dir`, else systemd's $STATE_DIRECTORY (its first entry), else
$XDG_STATE_HOME/optd, else ~/.local/state/optd. Unlike the daemon, this never creates anything.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

TOKEN_FILE = "control.token"


class TokenError(ValueError):
    """The token file exists but cannot be used; the message names the path."""


def state_dir(explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    if first := environ.get("STATE_DIRECTORY", "").split(":")[0]:
        return Path(first)
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path(environ.get("HOME") or Path.home()) / ".local/state"
    return base / "optd"


def read_token(directory: Path) -> str | None:
    """The token in `<directory>/control.token`; None when there is no such file (reads still work
    without a token from loopback; writes will be refused with the daemon's message)."""
    path = directory / TOKEN_FILE
    try:
        # O_NOFOLLOW and fstat on the open descriptor: the file checked is the file read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TokenError(f"{path}: cannot open the control token: {e.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise TokenError(f"{path}: refusing a control token that group or others can access "
                             f"(mode {mode:04o}); run `chmod 600 {path}`")
        token = f.read().strip()
    if not token:
        raise TokenError(f"{path}: the control token file is empty")
    return token


def find_token(explicit: str | None, directory: Path | None = None,
               environ: Mapping[str, str] = os.environ) -> str | None:
    if explicit is not None:
        if not explicit.strip():
            raise TokenError("--token: the token is empty")
        return explicit.strip()
    return read_token(state_dir(directory, environ))
