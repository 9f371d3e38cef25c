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
