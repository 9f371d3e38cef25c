"""The CLI's side of the control API: `optd status|knobs|pause|resume|decisions` over HTTP.

The token comes from --token, else the daemon's state directory (written there on first start, mode
0600). Output is human-readable by default and JSON with --json. A refusal by the daemon exits 2 with
its message; an unreachable daemon exits 1.
"""

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

from optd.daemon.state import read_control_token, state_dir


class ClientError(ValueError):
    """The daemon refused the command (its message included)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the daemon's base URL")
    p.add_argument("--token", default=None, help="control token (default: from the state directory)")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    token = args.token or read_control_token(state_dir(args.state_dir))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ClientError(f"{method} {path}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise ConnectionError(f"cannot reach the daemon at {args.url}: {e.reason}") from None


def _number(text: str) -> int | float:
    """Integer knobs must get JSON integers: '8' -> 8, '0.5' -> 0.5."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ClientError(f"value {text!r} is not a number") from None


def _show_knobs(answer: dict) -> str:
    pins = answer.get("pins", {})
    lines = []
    for name, value in answer["knobs"].items():
        pin = pins.get(name)
        note = f"  pinned ({pin.get('reason') or 'no reason'})" if pin else ""
        if pin and pin.get("expires_at"):
            note += f", expires at {pin['expires_at']:.0f}"
        lines.append(f"{name:<16}{value!s:>10}{note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "status":
        answer = call(args, "GET", "/v1/control/status")
        text = (f"paused: {answer['paused']}   policy: {answer['policy']}   mode: {answer['mode']}\n"
                f"engine: {answer['engine']}\n" + _show_knobs(answer))
    elif command == "knobs" and args.knobs_command == "set":
        body = {"value": _number(args.value), "ttl_s": args.ttl, "reason": args.reason}
        body = {k: v for k, v in body.items() if v is not None}
        answer = call(args, "PUT", f"/v1/control/knobs/{args.name}", body)
        text = f"{args.name} pinned at {answer['value']}"
    elif command == "knobs" and args.knobs_command == "unpin":
        answer = call(args, "DELETE", f"/v1/control/knobs/{args.name}")
        text = f"{args.name} unpinned, now {answer['value']}"
    elif command == "knobs":
        answer = call(args, "GET", "/v1/control/knobs")
        text = _show_knobs(answer)
    elif command in ("pause", "resume"):
        answer = call(args, "POST", f"/v1/control/{command}")
        text = "automation paused" if answer["paused"] else "automation resumed"
    else:
        answer = call(args, "GET", f"/v1/control/decisions?limit={args.limit}")
        rows = [f"{d['ts']:.0f} {d['knob']:<15} {d['old_value']!s:>6} -> {d['new_value']!s:<6} "
                f"{d['outcome']:<11} {d['reason']}" for d in answer["decisions"]]
        text = "\n".join(rows) or "no decisions"
    print(json.dumps(answer, indent=2) if args.json else text)
    return 0
