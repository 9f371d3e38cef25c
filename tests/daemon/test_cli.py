"""`optd generate` through the real console script."""

import subprocess
import sys


def optd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optd.daemon.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_on_the_demo_model():
    result = optd("generate", "--model", "demo", "--max-tokens", "24", "def fib(n):")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fib(n):") and len(result.stdout) > len("def fib(n):") + 10
    assert "24 tokens in" in result.stderr


def test_bad_input_exits_2_with_a_message():
    missing = optd("generate", "--model", "/no/such/model", "hi")
    assert missing.returncode == 2 and "no such checkpoint folder" in missing.stderr
    bad = optd("generate", "--model", "demo", "--max-tokens", "0", "hi")
    assert bad.returncode == 2 and "max_tokens" in bad.stderr


def test_generate_with_speculation_and_its_refusal():
    plain = optd("generate", "--model", "demo", "--max-tokens", "20", "import os")
    spec = optd("generate", "--model", "demo", "--draft-model", "demo-draft", "--spec-length", "4",
                "--max-tokens", "20", "import os")
    assert spec.returncode == 0 and spec.stdout == plain.stdout  # greedy: the same text
    refused = optd("generate", "--model", "demo", "--spec-length", "4", "x")
    assert refused.returncode == 2 and "needs a drafter" in refused.stderr


def test_db_upgrade_prune_downgrade_and_a_bad_config(tmp_path):
    state = ["--state-dir", str(tmp_path)]
    up = optd("db", *state, "upgrade")
    assert up.returncode == 0 and "schema at 0003" in up.stdout
    assert (tmp_path / "optd.db").exists()
    pruned = optd("db", *state, "prune", "--retention-s", "60")
    assert pruned.returncode == 0 and "rolled up 0 samples" in pruned.stdout
    down = optd("db", *state, "downgrade", "base")
    assert down.returncode == 0 and "schema at None" in down.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  nope: 1\n")
    refused = optd("db", "--config", str(bad), *state, "upgrade")
    assert refused.returncode == 2 and "bad.yaml:2: store.nope: unknown key" in refused.stderr
