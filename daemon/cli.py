"""The `optd` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad input."""

import argparse
import asyncio
import sys
import time

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one-shot generation, no daemon")
    _generate_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as e:
        print(f"optd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        print(f"optd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
