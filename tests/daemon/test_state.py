"""The state directory and the control token: where they are, their modes, reuse, refusal."""

import os
import stat
from pathlib import Path

import pytest

from optd.daemon.state import StateError, control_token, read_control_token, state_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_explicit_state_dir_wins_and_is_created_0700(tmp_path):
    wanted = tmp_path / "a" / "state"
    got = state_dir(wanted, environ={"STATE_DIRECTORY": str(tmp_path / "systemd"), "HOME": str(tmp_path)})
    assert got == wanted and got.is_dir() and mode(got) == 0o700
    assert not (tmp_path / "systemd").exists()


def test_systemd_state_directory_first_entry(tmp_path):
    first, second = tmp_path / "optd", tmp_path / "other"
    got = state_dir(None, environ={"STATE_DIRECTORY": f"{first}:{second}", "HOME": str(tmp_path / "home")})
    assert got == first and first.is_dir() and not second.exists()


def test_home_fallback(tmp_path):
    got = state_dir(None, environ={"HOME": str(tmp_path), "STATE_DIRECTORY": ""})
    assert got == tmp_path / ".local" / "state" / "optd" and mode(got) == 0o700
    got = state_dir(None, environ={"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "xdg")})
    assert got == tmp_path / "xdg" / "optd"


def test_existing_directory_mode_is_left_alone(tmp_path):
    existing = tmp_path / "s"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)          # mkdir's mode is masked by the umask
    assert state_dir(existing, environ={}) == existing and mode(existing) == 0o755


def test_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StateError, match=r"/f: "):
        state_dir(tmp_path / "f", environ={})


def test_token_generated_once_with_mode_0600_and_reused(tmp_path):
    assert read_control_token(tmp_path) is None
    token = control_token(tmp_path, None)
    path = tmp_path / "control.token"
    assert len(token) >= 40 and mode(path) == 0o600
    assert path.read_text() == token + "\n"
    assert control_token(tmp_path, None) == token == read_control_token(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.token"]     # no temporary left behind


def test_configured_token_wins_and_writes_nothing(tmp_path):
    assert control_token(tmp_path, "configured-token-0123") == "configured-token-0123"
    assert not (tmp_path / "control.token").exists()
    with pytest.raises(StateError, match="empty"):
        control_token(tmp_path, "  ")


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o620])
def test_refuses_a_token_file_others_can_access(tmp_path, bad_mode):
    path = tmp_path / "control.token"
    path.write_text("some-token\n")
    os.chmod(path, bad_mode)
    with pytest.raises(StateError) as e:
        control_token(tmp_path, None)
    assert str(path) in str(e.value) and f"{bad_mode:04o}" in str(e.value)
    assert path.read_text() == "some-token\n"                               # left as it was


def test_refuses_an_empty_token_file_and_a_symlink(tmp_path):
    path = tmp_path / "control.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(StateError, match=r"control\.token: the control token file is empty"):
        control_token(tmp_path, None)
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("x" * 20)
    os.chmod(target, 0o600)
    path.symlink_to(target)
    with pytest.raises(StateError, match=r"control\.token: cannot open"):
        control_token(tmp_path, None)


def test_a_token_written_by_someone_else_first_is_used(tmp_path):
    # What a second daemon starting at the same moment finds: the file appeared between its read and
    # its link; link() refuses to replace it and the existing token is returned.
    path = tmp_path / "control.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"first-token\n")
    os.close(fd)
    from optd.daemon import state

    assert state._create_token(tmp_path) == "first-token"
    assert path.read_text() == "first-token\n"
