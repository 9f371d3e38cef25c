"""`optd policy check` and `optd policy explain` through the real command line."""

import fnmatch
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import yaml

from optd.daemon.cli import main
from optd.policies.loader import load_policy, parse_policy

BAD = textwrap.dedent("""\
    apiVersion: optd/v1
    kind: Policy
    metadata: {name: bad}
    include: [balanced]
    spec:
      evaluate_every: soon
      rules:
        - name: r
          when: "avg(kv_usage, 30s) > 0.9 and last(waiting) > 0"
          then: {increase: {kv_compression: 0.25}}
    """)
CHILD = textwrap.dedent("""\
    apiVersion: optd/v1
    kind: Policy
    metadata: {name: mine, description: balanced with a tighter ITL objective}
    include: [balanced]
    spec:
      slo: {itl_p95: 40ms}
      knobs:
        max_batch_size: {max: 64}
    """)


def test_check_through_the_installed_entry_point(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "child.yaml").write_text(CHILD)
    result = subprocess.run([sys.executable, "-m", "optd.daemon.cli", "policy", "check", "child.yaml",
                             "latency", "bad.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == ["child.yaml: ok (policy mine, includes preset:balanced)",
                                          "latency: ok (policy latency, includes preset:balanced)"]
    assert result.stderr.splitlines() == [
        "bad.yaml:6: spec.evaluate_every: expected a duration like 800ms, 30s, 5m or 1h, got 'soon'",
        "bad.yaml:9: spec.rules[0].when: unknown metric 'waiting' in "
        "'avg(kv_usage, 30s) > 0.9 and last(waiting) > 0'",
    ]


def test_check_all_good_exits_0(capsys):
    assert main(["policy", "check", "balanced", "observe-only", "quality-first"]) == 0
    assert capsys.readouterr().out.count(": ok (policy ") == 3


def test_check_reports_unknown_names_and_unreadable_files(tmp_path, capsys):
    assert main(["policy", "check", "no-such-policy", str(tmp_path / "gone.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("no-such-policy: no policy named 'no-such-policy'")
    assert err[1] == f"{tmp_path / 'gone.yaml'}: no such policy file: {tmp_path / 'gone.yaml'}"


def test_check_uses_the_search_path_given(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(CHILD)
    assert main(["policy", "check", "--search-path", str(tmp_path), "mine"]) == 0
    assert capsys.readouterr().out == "mine: ok (policy mine, includes preset:balanced)\n"


def test_explain_prints_the_effective_policy_with_defaults(tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text(CHILD)
    assert main(["policy", "explain", str(child)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective policy 'mine' from {child}\n# includes merged")
    doc = yaml.safe_load(out)
    spec = doc["spec"]
    assert doc["include"] == [] and doc["metadata"]["name"] == "mine"
    assert spec["slo"] == {"ttft_p95": 0.8, "itl_p95": 0.04, "e2e_p95": None}       # merged key by key
    assert spec["knobs"]["max_batch_size"] == {"min": 1, "max": 64, "controller": "aimd", "tolerance": 0}
    assert spec["guardrails"][0]["cooldown"] == 300 and spec["quality_probe_every"] == 300   # defaults
    assert spec["rules"][0]["for"] == 15
    assert spec["rules"][0]["then"] == {"increase": {"kv_compression": 0.25}}
    # what explain prints is itself a valid, complete policy equal to the one loaded
    assert parse_policy(out, "explained.yaml", search_path=[]).policy == load_policy(child).policy


def test_explain_a_preset_and_a_bad_one(tmp_path, capsys):
    assert main(["policy", "explain", "observe-only"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["mode"] == "observe"
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["policy", "explain", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"{bad}:6: spec.evaluate_every: ")


def test_presets_are_package_data():
    # An installed (non-editable) optd only has the presets if pyproject.toml ships them.
    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    presets = sorted((root / "policies" / "presets").glob("*.yaml"))
    assert len(presets) == 6
    for preset in presets:
        relative = preset.relative_to(root / "policies").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in config["optd.policies"]), relative
