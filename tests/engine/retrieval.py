"""Long-context retrieval on the demo model: how much a name's definition early in a Python file helps
predict the name where it is used hundreds of tokens later (shared by the CI test and
bench/kv_capacity.py).

The demo model is too small to copy such a name greedily, but it does raise the name's probability
when the definition is in context; that gain, in nats, is what a compressed cache must preserve (the
definition then sits in packed pages, far outside the 16-bit recent window)."""

import inspect
import textwrap

from optd.engine import Engine

CASES = [  # (a definition early in a file, the code that uses it late, the rest of the name)
    ("def frobnicate_header_table(rows):\n    return rows\n", "    out = frobnicate_", "header_table(rows)"),
    ("QUUX_LIMIT_FACTOR = 17\n", "    limit = QUUX_", "LIMIT_FACTOR * 2"),
    ("class ZebraRecordParser:\n    pass\n", "    parser = Zebra", "RecordParser()"),
    ("def render_velvet_summary(x):\n    return x\n", "    text = render_", "velvet_summary(x)"),
    ("GLOBAL_ZORBLAX_COUNT = 0\n", "    GLOBAL_ZORB", "LAX_COUNT += 1"),
    ("def compute_quxxy_total(items):\n    return sum(items)\n", "    n = compute_", "quxxy_total(items)"),
]


def long_prompt(n_tokens: int, tokenizer) -> str:
    """About n_tokens of real Python (the standard library's textwrap module, repeated as needed)."""
    text = inspect.getsource(textwrap) * 4
    return tokenizer.decode(tokenizer.encode(text)[:n_tokens])


def recall_gain(engine: Engine, filler_tokens: int) -> float:
    """Mean over CASES of log p(rest of the name | file) with the definition at the top of the file minus
    the same without it, in nats, under the engine's current knobs."""
    tok = engine.tokenizer
    filler = long_prompt(filler_tokens, tok)
    gains = []
    for head, use, rest in CASES:
        scores = []
        for top in (head, ""):
            context = tok.encode(f"{top}\n{filler}\n\ndef main():\n{use}")
            ids = context + tok.encode(rest)
            scores.append(sum(engine.logprobs(ids, len(context))))
        gains.append(scores[0] - scores[1])
    return sum(gains) / len(gains)
