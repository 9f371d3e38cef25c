"""`optd policy replay FILE|PRESET --db URL [--since TS|DURATION]`: the decisions a policy would have made
over the samples a daemon recorded (optd.policies.replay), printed as a table or JSON. No engine.

The database is --db, else the config's store.url, else optd.db in the state directory (as `optd db`).
The engine envelope (max_num_seqs, max_spec_length, whether there is a drafter) and the window length
(telemetry.ring_buffer_s) come from the same config, so the bounds are the live daemon's. Samples are
read in ts order, a page at a time. Exit codes: 0 ok, 2 bad input (policy, --since, config), 1 when the
database cannot be read.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from optd.policies.cli import search_path_argument
from optd.policies.durations import DURATION_RE, parse_duration
from optd.policies.errors import PolicyError
from optd.policies.loader import load_policy
from optd.policies.replay import replay, table

PAGE = 5000


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Add `replay` to the `optd policy` subcommands."""
    p = sub.add_parser("replay", help="print the decisions a policy would have made over recorded samples")
    p.add_argument("ref", metavar="FILE|PRESET", help="policy file or name")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: the config's, else optd.db in the "
                                              "state directory)")
    p.add_argument("--since", default=None, metavar="TS|DURATION",
                   help="only samples from then on: a duration back from now (30m, 2h) or a time "
                        "(epoch seconds, or ISO 8601, UTC unless it says otherwise)")
    p.add_argument("--json", action="store_true", help="the decisions as a JSON array")
    p.add_argument("--config", type=Path, default=None, help="daemon config (engine envelope, ring buffer, "
                                                             "store.url)")
    p.add_argument("--state-dir", type=Path, default=None)
    search_path_argument(p)
    p.set_defaults(func=cmd_replay)


def parse_since(text: str, now: float) -> float:
    """Epoch seconds: `now` minus a duration with a unit, or an epoch timestamp, or an ISO 8601 time."""
    t = text.strip()
    if DURATION_RE.fullmatch(t):
        return now - parse_duration(t)
    try:
        return float(t)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"--since: {text!r} is neither a duration with a unit (30m, 2h), epoch seconds "
                         "nor an ISO 8601 time") from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def read_samples(store, since: float) -> Iterator[dict]:
    """Every sample with ts >= since, in (ts, id) order, a page at a time."""
    skip = 0
    while True:
        page = store.recent_samples(since, limit=PAGE + skip)[skip:]
        yield from page
        if len(page) < PAGE:
            return
        last = page[-1]["ts"]
        # The next page starts at `last` again: skip the rows of that ts already read.
        skip = sum(1 for s in page if s["ts"] == last) + (skip if last == since else 0)
        since = last


def cmd_replay(args: argparse.Namespace) -> int:
    from optd.daemon.config import load_config
    from optd.daemon.policy_job import envelope
    from optd.daemon.state import state_dir
    from optd.daemon.store import Store

    try:
        loaded = load_policy(args.ref, args.search_path)
    except PolicyError as e:
        for err in e.errors:
            print(f"optd: error: {err if err.file else f'{args.ref}: {err}'}", file=sys.stderr)
        return 2
    since = parse_since(args.since, time.time()) if args.since is not None else 0.0
    config = load_config(args.config, {"store": {"url": args.db}})
    url = config.store.database_url(state_dir(args.state_dir))
    e = config.engine
    bounds = envelope(e.max_num_seqs, e.max_spec_length, e.draft_model is not None)
    with Store(url) as store:
        decisions = list(replay(loaded, read_samples(store, since), knob_bounds=bounds,
                                history_s=config.telemetry.ring_buffer_s))
    if args.json:
        print(json.dumps([d.model_dump() for d in decisions], indent=2))
    else:
        print(table(decisions) or "no decisions")
    return 0
