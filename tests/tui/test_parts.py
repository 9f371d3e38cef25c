"""The dashboard's parts without a screen: the SSE parser, the API models, what the pin modal accepts,
the decision filter, the token lookup, and how events change the state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from optd.daemon.cli import main
from optd.tui.limits import knob_range, parse_ttl, parse_value
from optd.tui.models import Decision, PolicyInfo
from optd.tui.screens.filter import parse_filter
from optd.tui.sse import SseEvent, SseParser
from optd.tui.state import DashboardState, Snapshot
from optd.tui.token import TokenError, find_token, state_dir
from tests.tui.test_snapshots import RECORDED, RecordedSource


def test_sse_parser_joins_data_lines_and_skips_comments():
    parser = SseParser()
    lines = [": connected", "", "event: sample", 'data: {"a":', "data: 1}", "", "data: x", "",
             ": keepalive", ""]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    assert events == [SseEvent("sample", '{"a":\n1}'), SseEvent("message", "x")]


def test_decision_inputs_inline_or_nested_and_policy_field_names():
    inline = Decision.model_validate({"ts": 1.0, "knob": "spec_length", "old_value": 4, "new_value": 2,
                                      "outcome": "applied", "reason": "r", "source": "api", "action": "pin"})
    assert inline.inputs == {"action": "pin"} and inline.source == "api"
    nested = Decision.model_validate({"ts": 1.0, "knob": "max_batch_size", "old": 8, "new": 4,
                                      "outcome": "held", "inputs": {"itl_p95": 0.07}})
    assert (nested.old_value, nested.new_value, nested.inputs) == (8, 4, {"itl_p95": 0.07})


def test_policy_info_reads_bounds_slo_and_guardrails_from_the_effective_yaml():
    info = PolicyInfo.model_validate(RECORDED["policy"])
    assert info.name == "balanced" and info.mode == "enforce"
    assert (info.bounds["max_batch_size"].min, info.bounds["max_batch_size"].max) == (1, 128)
    assert info.slo == {"ttft_p95": 0.8, "itl_p95": 0.06}
    assert info.guardrails == {"quality_top1_min": 0.97, "quality_kl_max": 0.05}


@pytest.mark.parametrize(("knob", "text", "expected"), [
    ("spec_length", "3", 3), ("max_batch_size", "128", 128), ("weight_bits", "8", 8),
    ("kv_compression", "0.5", 0.5)])
def test_pin_values_accepted(knob, text, expected):
    value = parse_value(knob, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("knob", "text", "message"), [
    ("spec_length", "", "enter a number"), ("spec_length", "two", "'two' is not a number"),
    ("spec_length", "2.5", "whole number"), ("spec_length", "33", "in 0..32"),
    ("max_batch_size", "0", "≥ 1"), ("kv_compression", "0.99", "in 0..0.95"),
    ("weight_bits", "6", "one of 4, 8, 16"), ("spec_length", "nan", "not a finite number"),
    ("max_batch_size", "9", "in 1..8")])
def test_pin_values_refused_with_the_reason(knob, text, message):
    reported = {"min": 1, "max": 8} if text == "9" else None     # a range the daemon reported
    with pytest.raises(ValueError, match=message) as err:
        parse_value(knob, text, reported)
    assert str(err.value).startswith("value: ")


def test_pin_values_against_the_ranges_the_daemon_reports():
    # GET /v1/control/knobs' `ranges` as optd.daemon.control_api writes them (test_request_errors.py
    # checks the daemon's side): the engine's envelope narrows the natural range
    ranges = {"spec_length": {"min": 0, "max": 0, "integer": True, "supported": False,
                              "reason": "spec_length needs a drafter: start the engine with draft_model set"},
              "max_batch_size": {"min": 1, "max": 8, "integer": True, "supported": True},
              "kv_compression": {"min": 0.0, "max": 0.0, "integer": False, "supported": False,
                                 "reason": "kv_compression is not supported by this engine yet"}}
    assert parse_value("max_batch_size", "8", ranges["max_batch_size"]) == 8
    assert knob_range("max_batch_size", ranges["max_batch_size"]).describe() == "whole number in 1..8"
    with pytest.raises(ValueError, match=r"must be a whole number in 1\.\.8, got 9"):
        parse_value("max_batch_size", "9", ranges["max_batch_size"])
    for knob in ("spec_length", "kv_compression"):  # refused whatever the value, saying why
        with pytest.raises(ValueError, match=f"value: {knob} is not adjustable on this engine") as err:
            parse_value(knob, "0", ranges[knob])
        assert ranges[knob]["reason"] in str(err.value)
    # a malformed entry is ignored (the daemon checks again): the natural range applies
    assert knob_range("max_batch_size", {"min": "x"}).describe() == "whole number ≥ 1"


def test_pin_ttl():
    assert parse_ttl("") is None and parse_ttl("90") == 90 and parse_ttl("10m") == 600
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ValueError, match=r"^ttl: "):
            parse_ttl(bad)


def test_filter_words():
    assert parse_filter("") == (None, None)
    assert parse_filter("spec rej") == ("spec_length", "rejected")
    assert parse_filter("knob=max_batch_size outcome=held") == ("max_batch_size", "held")
    with pytest.raises(ValueError, match=r"'r' names no single knob or outcome \(could be rejected, rolled_"):
        parse_filter("r")
    with pytest.raises(ValueError, match="'zzz' names no single"):
        parse_filter("zzz")


def test_token_lookup(tmp_path):
    env = {"HOME": str(tmp_path / "home")}
    assert state_dir(None, env) == tmp_path / "home/.local/state/optd"
    assert state_dir(None, {**env, "STATE_DIRECTORY": "/var/lib/optd:/other"}) == Path("/var/lib/optd")
    assert find_token(None, tmp_path) is None                    # no daemon has started here
    token = tmp_path / "control.token"
    token.write_text("secret\n")
    token.chmod(0o600)
    assert find_token(None, tmp_path) == "secret" and find_token("given", tmp_path) == "given"
    token.chmod(0o644)
    with pytest.raises(TokenError, match="group or others"):
        find_token(None, tmp_path)


def test_optd_top_refuses_a_readable_token_file_with_exit_2(tmp_path, capsys):
    (tmp_path / "control.token").write_text("secret\n")
    (tmp_path / "control.token").chmod(0o644)
    assert main(["top", "--state-dir", str(tmp_path)]) == 2
    assert "control.token: refusing a control token" in capsys.readouterr().err
    assert main(["top", "--url", "localhost:8000", "--token", "t"]) == 2
    assert "--url: expected http://HOST:PORT" in capsys.readouterr().err


async def _snapshot() -> Snapshot:
    src = RecordedSource(RECORDED)
    return Snapshot(await src.status(), await src.info(), await src.policy(), await src.telemetry(60),
                    await src.decisions())


def test_events_update_the_state():
    state = DashboardState(label="x")
    state.connected(asyncio.run(_snapshot()))
    last = state.samples[-1]["ts"]
    assert state.knobs["spec_length"] == 2 and isinstance(state.knobs["spec_length"], int)
    # a sample moves the knobs and the charts; one older than the newest (a replay) is ignored
    assert state.apply_event("sample", {"ts": last + 1, "spec_length": 5.0, "tokens_per_s": 9.0}) is False
    assert state.knobs["spec_length"] == 5 and state.latest("tokens_per_s") == 9.0
    state.apply_event("sample", {"ts": last - 5, "tokens_per_s": 1.0})
    assert state.latest("tokens_per_s") == 9.0
    # a policy decision lands in the log; an override also asks for the status (pins changed)
    decision = {"ts": last + 2, "knob": "max_batch_size", "old_value": 57, "new_value": 56,
                "outcome": "held", "reason": "damping", "inputs": {}}
    assert state.apply_event("decision", decision) is False
    assert state.decisions[0].reason == "damping"
    state.apply_event("decision", decision)                     # the same one again: not twice
    assert sum(d.reason == "damping" for d in state.decisions) == 1
    assert state.apply_event("override", {**decision, "ts": last + 3, "outcome": "applied"}) is True
    assert state.apply_event("pause", {"paused": True}) is False and state.status.paused
    state.knob_filter, state.outcome_filter = "max_batch_size", "held"
    assert [d.reason for d in state.visible_decisions()] == ["damping"]
    assert state.apply_event("sample", {"no": "ts"}) is True     # unreadable: read the status again
