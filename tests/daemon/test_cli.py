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
