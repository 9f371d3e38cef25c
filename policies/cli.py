"""`optd policy check FILE...` and `optd policy explain FILE|PRESET` (wired into optd.daemon.cli).

Exit codes as for the rest of optd: 0 ok, 2 bad input (any policy that does not load).
"""

import argparse
import sys
from pathlib import Path

from optd.policies.errors import PolicyError
from optd.policies.loader import DEFAULT_SEARCH_PATH, load_policy, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Add the `check` and `explain` subcommands; returns the subparsers so others can add more."""
    sub = parser.add_subparsers(dest="policy_command", required=True)
    check = sub.add_parser("check", help="validate policy files; 'FILE:LINE: PATH: MESSAGE' for each error")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy file or preset name")
    search_path_argument(check)
    check.set_defaults(func=cmd_check)
    explain = sub.add_parser("explain",
                             help="print the effective policy: includes merged, defaults filled in")
    explain.add_argument("ref", metavar="FILE|PRESET",
                         help=f"policy file or name (bundled presets: {', '.join(preset_names())})")
    search_path_argument(explain)
    explain.set_defaults(func=cmd_explain)
    return sub


def search_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search-path", type=Path, action="append", default=None, metavar="DIR",
                        help="directory searched for policy names, lowest precedence first (repeatable; "
                             f"default: {', '.join(str(p) for p in DEFAULT_SEARCH_PATH)}; "
                             "the bundled presets come last)")


def cmd_check(args: argparse.Namespace) -> int:
    failed = False
    for ref in args.files:
        try:
            loaded = load_policy(ref, args.search_path)
        except PolicyError as e:
            failed = True
            for err in e.errors:
                print(err if err.file else f"{ref}: {err}", file=sys.stderr)
            continue
        extends = f", includes {', '.join(loaded.includes)}" if loaded.includes else ""
        print(f"{ref}: ok (policy {loaded.name}{extends})")
    return 2 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.ref, args.search_path)
    except PolicyError as e:
        for err in e.errors:
            print(err if err.file else f"{args.ref}: {err}", file=sys.stderr)
        return 2
    print(f"# effective policy {loaded.name!r} from {loaded.source}")
    if loaded.includes:
        print(f"# includes merged (first to last, then this file): {', '.join(loaded.includes)}")
    print("# durations in seconds; every default filled in")
    sys.stdout.write(loaded.text)
    return 0

