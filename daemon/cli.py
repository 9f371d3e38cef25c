"""The `optd` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad input."""

import argparse
import asyncio
import functools
import sys
import time
from pathlib import Path

from optd.engine import Engine, EngineConfig, EngineError, SamplingParams


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="checkpoint folder, or 'demo' (the bundled model)")
    p.add_argument("--draft-model", default=None, help="draft folder, 'demo-draft' or 'ngram'")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)


def _generate_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    p.add_argument("prompt", nargs="+", help="prompt text (several words are joined by spaces)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--spec-length", type=int, default=0, help="draft tokens per step (needs --draft-model)")


async def _stream(engine: Engine, prompt: str, params: SamplingParams) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    async for delta in engine.submit(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        tokens = delta.completion_tokens
        if delta.error:
            raise RuntimeError(delta.error)
    return tokens, time.perf_counter() - start


def cmd_generate(args: argparse.Namespace) -> int:
    config = EngineConfig(model=args.model, draft_model=args.draft_model, device=args.device,
                          dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    prompt = " ".join(args.prompt)
    with Engine(config) as engine:
        if args.spec_length:
            outcome = engine.apply(spec_length=args.spec_length)["spec_length"]
            if outcome.status != "applied":
                raise EngineError(f"--spec-length: {outcome.reason}")
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        sys.stdout.write(prompt)
        tokens, seconds = asyncio.run(_stream(engine, prompt, params))
    print(f"\n[{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from optd.daemon.config import load_config
    from optd.daemon.serve import serve
    from optd.daemon.state import state_dir

    overrides = {
        "engine": {"model": args.model, "draft_model": args.draft_model, "device": args.device},
        "server": {"host": args.host, "port": args.port},
        "store": {"url": args.db},
        "mqtt": {"url": args.mqtt},
        "policy": args.policy,
    }
    # --demo changes defaults only: the config file, OPTD_* variables and flags still win.
    from optd.daemon.load import DEMO_CONFIG

    defaults = DEMO_CONFIG if args.demo else None
    config = load_config(args.config, overrides, defaults=defaults)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Every run of every job at INFO drowns the log; missed and failed runs are still warnings.
    logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)
    # SIGHUP loads the configuration again from the same sources, flags included.
    reload = functools.partial(load_config, args.config, overrides, defaults=defaults)
    return asyncio.run(serve(config, state_dir(args.state_dir), demo=args.demo, load=reload))


def cmd_load(args: argparse.Namespace) -> int:
    from optd.daemon.load import run_cli

    return run_cli(args)


def cmd_client(args: argparse.Namespace) -> int:
    from optd.daemon.client import run

    return run(args)


def cmd_top(args: argparse.Namespace) -> int:
    # Imported here: Textual loads only for the dashboard, and the dashboard never imports the daemon.
    if args.mqtt is not None:
        if args.url is not None:
            raise ValueError("--url and --mqtt: give one (the fleet view opens each node's own URL)")
        from optd.tui.fleet.main import run as fleet

        return fleet(args.mqtt, args.prefix, args.token, args.state_dir, args.hmac_secret)
    from optd.tui.main import run

    return run(args.url or "http://127.0.0.1:8000", args.token, args.state_dir)


def client_args(parser: argparse.ArgumentParser) -> None:
    from optd.daemon.client import add_arguments

    add_arguments(parser)


def _database_url(args: argparse.Namespace) -> str:
    """--db, else the config's store.url, else optd.db in the state directory."""
    from optd.daemon.config import load_config
    from optd.daemon.state import state_dir

    config = load_config(args.config, {"store": {"url": args.db}})
    return config.store.database_url(state_dir(args.state_dir))


def cmd_db(args: argparse.Namespace) -> int:
    from optd.daemon import db

    url = _database_url(args)
    if args.db_command == "upgrade":
        db.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        db.downgrade(url, args.revision)
    else:
        from optd.daemon.config import load_config

        retention = args.retention_s or load_config(args.config).store.raw_retention_s
        result = db.prune(url, retention)
        print(f"rolled up {result.samples_rolled_up} samples into {result.minutes} one-minute rows; "
              f"deleted {result.requests_deleted} request records")
    print(f"{url}: schema at {db.current(url)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one-shot generation, no daemon")
    _generate_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="run the daemon: engine, OpenAI-compatible API, telemetry, store")
    srv.add_argument("--config", type=Path, default=None, help="YAML config (default /etc/optd/optd.yaml)")
    srv.add_argument("--model", default=None, help="checkpoint folder, or 'demo'")
    srv.add_argument("--draft-model", default=None, help="draft folder, 'demo-draft' or 'ngram'")
    srv.add_argument("--device", default=None)
    srv.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--db", default=None, help="SQLAlchemy URL (default: optd.db in the state directory)")
    srv.add_argument("--policy", default=None,
                     help="policy preset name (e.g. balanced) or YAML file; default: the config's, else none")
    srv.add_argument("--state-dir", type=Path, default=None)
    srv.add_argument("--mqtt", default=None, metavar="URL",
                     help="MQTT broker (mqtt://HOST[:PORT], mqtts://...): state, telemetry, decisions out")
    srv.add_argument("--demo", action="store_true",
                     help="the bundled demo pair with speculation on, and a built-in load at a modest rate")
    srv.set_defaults(func=cmd_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        client_args(parser)
        parser.set_defaults(func=cmd_client)
        return parser

    top = sub.add_parser("top", help="the dashboard: watch the control loop and override it")
    top.add_argument("--url", default=None, help="the daemon's base URL (default http://127.0.0.1:8000)")
    top.add_argument("--token", default=None, help="control token (default: from the state directory)")
    top.add_argument("--state-dir", type=Path, default=None, help="where the daemon keeps control.token")
    top.add_argument("--mqtt", default=None, metavar="URL",
                     help="the fleet view: every node on this broker (mqtt://HOST[:PORT], mqtts://...)")
    top.add_argument("--prefix", default="optd/v1", help="with --mqtt: the nodes' topic prefix")
    top.add_argument("--hmac-secret", default=None,
                     help="with --mqtt: sign fleet commands (default: $OPTD_MQTT__HMAC_SECRET)")
    top.set_defaults(func=cmd_top)

    client("status", "the daemon's knobs, pins, policy and engine state")
    knobs = client("knobs", "show knobs; set (pin) or unpin one")
    knob_sub = knobs.add_subparsers(dest="knobs_command")
    pin = knob_sub.add_parser("set", help="pin a knob to a value")
    pin.add_argument("name")
    pin.add_argument("value")
    pin.add_argument("--ttl", type=float, default=None, help="seconds until the pin expires")
    pin.add_argument("--reason", default=None)
    knob_sub.add_parser("unpin", help="release a pinned knob").add_argument("name")
    client("pause", "pause automation")
    client("resume", "resume automation")
    client("decisions", "recent decisions, newest first").add_argument("--limit", type=int, default=20)

    from optd.daemon.load import add_arguments as load_args

    load = sub.add_parser("load", help="generate OpenAI-API load and report throughput, latency, goodput")
    load_args(load)
    load.set_defaults(func=cmd_load)

    from optd.daemon.policy_replay import add_arguments as replay_args
    from optd.policies.cli import add_arguments as policy_args

    replay_args(policy_args(sub.add_parser("policy", help="check, explain and replay policies")))

    dbp = sub.add_parser("db", help="database schema and retention")
    dbp.add_argument("--db", default=None, help="SQLAlchemy URL (default: optd.db in the state directory)")
    dbp.add_argument("--config", type=Path, default=None, help="daemon config file (YAML)")
    dbp.add_argument("--state-dir", type=Path, default=None)
    db_sub = dbp.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate to a revision")
    upgrade.add_argument("revision", nargs="?", default="head")
    db_sub.add_parser("downgrade", help="migrate back to a revision").add_argument("revision")
    prune = db_sub.add_parser("prune", help="roll old raw samples into one-minute rows")
    prune.add_argument("--retention-s", type=float, default=None, help="keep raw samples this long")
    dbp.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EngineError, ValueError) as e:  # bad input: a request, model, config or state file
        print(f"optd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        print(f"optd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
