"""The state directory (default database, control token) and the control token in it."""

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

TOKEN_FILE = "control.token"


class StateError(ValueError):
    """The state directory or a file in it cannot be used; the message names the path."""


def state_dir(explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """`--state-dir`, else systemd's $STATE_DIRECTORY (its first entry), else $XDG_STATE_HOME/optd
    (~/.local/state/optd); created with mode 0700 if missing. An existing directory's mode is left
    alone: systemd owns StateDirectory= and its StateDirectoryMode=."""
    if explicit is not None:
        path = Path(explicit).expanduser()
    elif first := environ.get("STATE_DIRECTORY", "").split(":")[0]:
        # systemd lists one path per StateDirectory= entry, separated by colons.
        path = Path(first)
    else:
        xdg = environ.get("XDG_STATE_HOME", "")
        # The XDG spec says to ignore a relative value.
        base = Path(xdg) if os.path.isabs(xdg) else Path(environ.get("HOME") or Path.home()) / ".local/state"
        path = base / "optd"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"{path}: cannot create the state directory: {e.strerror}") from None
    if not path.is_dir():
        raise StateError(f"{path}: the state directory is not a directory")
    return path


def read_control_token(state_dir: Path) -> str | None:
    """The token in `<state_dir>/control.token`, or None if there is none. What CLI clients use:
    they must never generate one."""
    path = state_dir / TOKEN_FILE
    try:
        # O_NOFOLLOW and fstat on the open descriptor: the file checked is the file read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot open the control token: {e.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise StateError(f"{path}: refusing a control token that group or others can access "
                             f"(mode {mode:04o}); run `chmod 600 {path}`, or delete it to generate a new one")
        token = f.read().strip()
    if not token:
        raise StateError(f"{path}: the control token file is empty; delete it to generate a new one")
    return token


def control_token(state_dir: Path, configured: str | None) -> str:
    """The configured token if any; else the one in the state directory; else a new one written there
    with mode 0600."""
    if configured is not None:
        if not configured.strip():
            raise StateError("the configured control token is empty")
        return configured
    if (token := read_control_token(state_dir)) is not None:
        return token
    return _create_token(state_dir)


def _create_token(state_dir: Path) -> str:
    token = secrets.token_urlsafe(32)
    path = state_dir / TOKEN_FILE
    tmp = state_dir / f".{TOKEN_FILE}.{secrets.token_hex(8)}"
    # Created 0600 by open() itself (O_EXCL: never someone else's file), so the token is not readable by
    # others even for a moment; written in full before it gets its name, so no reader sees it half-written.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"{state_dir}: cannot write a control token there: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            # link(), unlike rename(), fails if the name exists: of two daemons starting at once,
            # one token wins and both use it.
            os.link(tmp, path)
        except FileExistsError:
            return read_control_token(state_dir) or _create_token(state_dir)
        _fsync_dir(state_dir)
        return token
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
