"""deploy/optd.service and its GPU drop-ins: the directives the daemon relies on, and `systemd-analyze
verify` clean on the unit alone and with each drop-in applied.

Verification runs on a copy whose ExecStart= names an existing binary (verify checks that it exists; the
shipped /usr/bin/optd is not installed here), with the drop-in in `<copy>.d/` beside it, which is where
systemd-analyze looks for it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "optd.service"
DROP_INS = sorted((DEPLOY / "optd.service.d").glob("*.conf"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is not installed (Debian package: systemd)")


def directives(*files: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in order, over `files` as systemd reads them: later files add to list
    settings, and an empty assignment resets the list."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in files:
        section = ""
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):     # continuation lines
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not a key=value line: {line!r}"
            values = out.setdefault((section, key.strip()), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()
    return out


def last(d: dict[tuple[str, str], list[str]], key: str, section: str = "Service") -> str | None:
    values = d.get((section, key))
    return values[-1] if values else None


def seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600, "ms": 0.001}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if value.endswith(unit) and value[:-len(unit)].strip().isdigit():
            return float(value[:-len(unit)]) * factor
    return float(value)


def test_the_unit_has_what_the_daemon_relies_on():
    from optd.daemon.config import ServerSection

    d = directives(UNIT)
    assert last(d, "Type") == "notify" and last(d, "NotifyAccess") == "main"
    assert last(d, "ExecStart") == "/usr/bin/optd serve --config /etc/optd/optd.yaml"
    assert last(d, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(d, "KillSignal") == "SIGTERM"
    assert last(d, "Restart") == "on-failure"
    assert last(d, "RestartPreventExitStatus") == "2"            # bad config: no restart loop
    assert seconds(last(d, "WatchdogSec")) == 30
    assert seconds(last(d, "TimeoutStartSec")) >= 300          # model loading
    # The stop timeout must outlast the drain, or systemd kills in-flight requests mid-answer.
    assert seconds(last(d, "TimeoutStopSec")) > ServerSection().drain_timeout_s + 30
    assert last(d, "StateDirectory") == "optd" and last(d, "ConfigurationDirectory") == "optd"
    assert last(d, "DynamicUser") == "yes"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes"}.items():
        assert last(d, key) == value, key
    families = set(" ".join(d[("Service", "RestrictAddressFamilies")]).split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert last(d, "MemoryDenyWriteExecute") is None           # would break CUDA/Triton JIT


@pytest.mark.parametrize("name, groups, nodes", [
    ("nvidia.conf", None, {"char-nvidia", "char-nvidiactl", "char-nvidia-uvm", "char-nvidia-caps"}),
    ("amd.conf", "render video", {"char-kfd", "char-drm"}),
])
def test_each_gpu_drop_in_opens_only_its_device_nodes(name, groups, nodes):
    d = directives(UNIT, DEPLOY / "optd.service.d" / name)
    assert last(d, "PrivateDevices") == "no" and last(d, "DevicePolicy") == "closed"
    allowed = {entry.split()[0]: entry.split()[1] for entry in d[("Service", "DeviceAllow")]}
    assert nodes <= set(allowed) and all(set(access) <= set("rw") for access in allowed.values())
    assert last(d, "SupplementaryGroups") == groups
    assert last(d, "NoNewPrivileges") == "yes" and last(d, "ProtectSystem") == "strict"   # still hardened


def verify(tmp_path: Path, drop_in: Path | None = None, extra: str = "") -> tuple[int, list[str]]:
    """`systemd-analyze verify` on a copy of the unit (with `drop_in`, and `extra` appended to it);
    returns the exit code and the output lines that concern the copy."""
    unit = tmp_path / "optd.service"
    # Only the binary's path changes: verify checks that ExecStart's executable exists.
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/optd ", f"ExecStart={sys.executable} "))
    if drop_in is not None:
        (tmp_path / "optd.service.d").mkdir()
        (tmp_path / "optd.service.d" / drop_in.name).write_text(drop_in.read_text() + extra)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # Other units on this host may have their own complaints; only ours count.
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(tmp_path) in line or "optd.service" in line]
    return result.returncode, ours


@needs_analyze
@pytest.mark.parametrize("drop_in", [None, *DROP_INS], ids=lambda p: p.name if p else "unit-alone")
def test_systemd_analyze_verify_is_clean(tmp_path, drop_in):
    code, complaints = verify(tmp_path, drop_in)
    assert code == 0 and complaints == []


@needs_analyze
def test_verify_reads_the_drop_in(tmp_path):
    # The check above would pass vacuously if the drop-in were never read: a bad line in it must show.
    _, complaints = verify(tmp_path, DEPLOY / "optd.service.d" / "amd.conf",
                           extra="DeviceAllow=char-kfd rwz\n")
    assert any("amd.conf" in line and "rwz" in line for line in complaints), complaints
