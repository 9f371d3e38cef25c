"""Loading: presets, include inheritance and cycles, search path precedence, error locations,
and generated/mutated documents that must either load or fail with a PolicyError naming a path."""

import copy
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optd.policies.errors import PolicyError
from optd.policies.loader import PRESETS_DIR, load_policy, parse_policy, preset_names
from optd.policies.window import SampleSeries

PRESETS = ["balanced", "latency", "throughput", "memory-saver", "quality-first", "observe-only"]
HEADER = "apiVersion: optd/v1\nkind: Policy\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def policy_doc(name: str, spec: str = "", include: str = "") -> str:
    body = f"{HEADER}metadata: {{name: {name}}}\n"
    if include:
        body += f"include: {include}\n"
    return body + ("spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ") if spec else "")


def error_of(fn, *args, **kwargs) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_says_what_it_is_for_and_round_trips(name):
    assert sorted(PRESETS) == preset_names()
    text = (PRESETS_DIR / f"{name}.yaml").read_text()
    purpose = "# balanced: the default" if name == "balanced" else f"# {name}: for "
    assert text.startswith(purpose)
    loaded = load_policy(name, search_path=[])
    assert loaded.name == name and loaded.source == f"preset:{name}"
    assert loaded.policy.include == []
    assert loaded.includes == (() if name == "balanced" else ("preset:balanced",))
    # the effective text is a complete policy: loading it again gives the same policy
    again = parse_policy(loaded.text, "effective.yaml", search_path=[])
    assert again.policy == loaded.policy
    for path, expr in loaded.expressions.items():
        assert path.startswith(("spec.guardrails[", "spec.rules[")) and path.endswith("].when")
        assert expr.text


def test_presets_differ_where_they_say():
    observe = load_policy("observe-only", []).policy.spec
    balanced = load_policy("balanced", []).policy.spec
    assert observe.mode == "observe" and observe.model_copy(update={"mode": "enforce"}) == balanced
    quality = load_policy("quality-first", []).policy.spec
    assert quality.knobs["weight_bits"].controller == "none" and quality.rules == []
    assert quality.knobs["spec_length"] == balanced.knobs["spec_length"]  # inherited
    assert load_policy("memory-saver", []).policy.spec.knobs["weight_bits"].min == 4
    assert load_policy("latency", []).policy.spec.slo.itl_p95 == pytest.approx(0.03)


def test_include_merges_field_by_field_and_replaces_lists(tmp_path):
    write(tmp_path / "base.yaml", policy_doc("base", """\
        slo: {ttft_p95: 1s, itl_p95: 100ms}
        knobs:
          max_batch_size: {min: 1, max: 64, controller: aimd, tolerance: 2}
        rules:
          - {name: a, when: "last(kv_usage) > 0.9", then: {increase: {kv_compression: 0.1}}}
          - {name: b, when: "last(kv_usage) < 0.1", then: {decrease: {kv_compression: 0.1}}}
        """))
    child = write(tmp_path / "child.yaml", policy_doc("child", """\
        slo: {itl_p95: 50ms}
        knobs:
          max_batch_size: {max: 16}
        rules:
          - {name: c, when: "last(itl_p95) > slo.itl_p95", then: {decrease: {max_batch_size: 50%}}}
        """, include="[base.yaml]"))
    loaded = load_policy(child, [])
    spec = loaded.policy.spec
    assert (spec.slo.ttft_p95, spec.slo.itl_p95) == (1.0, 0.05)             # mapping merged key by key
    knob = spec.knobs["max_batch_size"]
    assert (knob.min, knob.max, knob.controller, knob.tolerance) == (1, 16, "aimd", 2)
    assert [r.name for r in spec.rules] == ["c"]                              # list replaced whole
    assert loaded.name == "child" and loaded.includes == (str(tmp_path / "base.yaml"),)
    # the rule's expression reads the merged SLO
    series = SampleSeries([{"ts": 1.0, "itl_p95": 0.07}])
    assert loaded.expressions["spec.rules[0].when"].evaluate(series) is True


def test_several_includes_merge_in_order_and_paths_are_relative_to_the_includer(tmp_path, monkeypatch):
    write(tmp_path / "lib" / "one.yaml", policy_doc("one", "evaluate_every: 1s\nquality_probe_every: 1m\n"))
    write(tmp_path / "lib" / "two.yaml", policy_doc("two", "evaluate_every: 2s\n", include="[one.yaml]"))
    write(tmp_path / "lib" / "three.yaml", policy_doc("three", "evaluate_every: 3s\nmode: observe\n"))
    top = write(tmp_path / "top" / "p.yaml", policy_doc("p", "mode: enforce\n",
                                                         include="[../lib/two.yaml, ../lib/three.yaml]"))
    monkeypatch.chdir(tmp_path / "lib")  # relative includes must not depend on the current directory
    spec = load_policy(top, []).policy.spec
    assert (spec.evaluate_every, spec.quality_probe_every, spec.mode) == (3.0, 60.0, "enforce")
    names = [Path(s).name for s in load_policy(top, []).includes]
    assert names == ["one.yaml", "two.yaml", "three.yaml"]


def test_include_cycles_are_rejected_with_the_chain(tmp_path):
    write(tmp_path / "a.yaml", policy_doc("a", include="[b.yaml]"))
    write(tmp_path / "b.yaml", policy_doc("b", include="[c.yaml]"))
    write(tmp_path / "c.yaml", policy_doc("c", include="[a.yaml]"))
    err = error_of(load_policy, tmp_path / "a.yaml", [])
    assert err.message.startswith("include cycle: ")
    chain = [Path(p).name for p in err.message.removeprefix("include cycle: ").split(" -> ")]
    assert chain == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]
    assert (Path(err.file).name, err.path, err.line) == ("c.yaml", "include[0]", 4)
    write(tmp_path / "self.yaml", policy_doc("self", include="[./self.yaml]"))
    assert "include cycle" in error_of(load_policy, tmp_path / "self.yaml", []).message
    # a diamond (two parents sharing a grandparent) is not a cycle
    write(tmp_path / "g.yaml", policy_doc("g", "evaluate_every: 7s\n"))
    write(tmp_path / "p1.yaml", policy_doc("p1", include="[g.yaml]"))
    write(tmp_path / "p2.yaml", policy_doc("p2", include="[g.yaml]"))
    write(tmp_path / "d.yaml", policy_doc("d", include="[p1.yaml, p2.yaml]"))
    assert load_policy(tmp_path / "d.yaml", []).policy.spec.evaluate_every == 7.0


def test_search_path_precedence(tmp_path, monkeypatch):
    usr, etc = tmp_path / "usr", tmp_path / "etc"
    search = [usr, etc]  # lowest precedence first, as DEFAULT_SEARCH_PATH
    write(usr / "custom.yaml", policy_doc("custom", "evaluate_every: 1s\n"))
    assert load_policy("custom", search).policy.spec.evaluate_every == 1.0
    write(etc / "custom.yaml", policy_doc("custom", "evaluate_every: 2s\n"))
    assert load_policy("custom", search).policy.spec.evaluate_every == 2.0         # /etc over /usr/lib
    assert load_policy(usr / "custom.yaml", search).policy.spec.evaluate_every == 1.0  # a path wins
    # a name in the search path shadows the bundled preset ...
    write(usr / "latency.yaml", policy_doc("latency", "evaluate_every: 3s\n"))
    assert load_policy("latency", search).source == str(usr / "latency.yaml")
    assert load_policy("latency", []).source == "preset:latency"
    # ... and an override that includes its own name extends the next one down, not itself
    write(etc / "balanced.yaml", policy_doc("balanced", "mode: observe\n", include="[balanced]"))
    loaded = load_policy("balanced", search)
    assert loaded.source == str(etc / "balanced.yaml") and loaded.includes == ("preset:balanced",)
    assert loaded.policy.spec.mode == "observe" and loaded.policy.spec.knobs["spec_length"].max == 8
    write(usr / "balanced.yaml", policy_doc("balanced", "evaluate_every: 9s\n", include="[balanced]"))
    loaded = load_policy("balanced", search)
    assert loaded.includes == ("preset:balanced", str(usr / "balanced.yaml"))
    assert (loaded.policy.spec.mode, loaded.policy.spec.evaluate_every) == ("observe", 9.0)
    # an existing file in the current directory is a path, not a name
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "custom", policy_doc("local", "evaluate_every: 4s\n"))
    assert load_policy("custom", search).name == "local"
    err = error_of(load_policy, "nothing-here", search)
    assert "no policy named 'nothing-here'" in err.message and str(etc) in err.message


def test_errors_name_file_path_and_line(tmp_path):
    text = textwrap.dedent("""\
        apiVersion: optd/v1
        kind: Policy
        metadata: {name: lines}
        spec:
          knobs:
            spec_length: {min: 0, max: 8, controller: goodput}
            weight_bits:
              min: 8
              max: 12
              controller: rules
          rules:
            - name: ok
              when: "last(kv_usage) > 0.5"
              then: {set: {spec_length: 2}}
            - name: bad
              when: "avg(kv_usage, 30s) > 0.9 and last(request_waiting) > 0"
              then: {set: {spec_length: 2}}
        """)
    err = error_of(parse_policy, text, "p.yaml")
    assert [(e.path, e.line) for e in err.errors] == [("spec.knobs.weight_bits.max", 9),
                                                      ("spec.rules[1].when", 16)]
    assert str(err) == "p.yaml:9: spec.knobs.weight_bits.max: weight_bits must be one of 4, 8, 16, got 12"
    assert "unknown metric 'request_waiting'" in err.errors[1].message
    # a missing key points at its parent's line; an unknown one at itself
    err = error_of(parse_policy, text.replace("      then: {set: {spec_length: 2}}\n", "", 1)
                   .replace("max: 12", "max: 16"), "p.yaml")
    assert (err.path, err.line, err.message) == ("spec.rules[0].then", 12, "required key missing")
    err = error_of(parse_policy, text.replace("max: 12", "max: 16\n      maxx: 3"), "p.yaml")
    assert (err.path, err.line) == ("spec.knobs.weight_bits.maxx", 10)
    assert "allowed: min, max, controller, tolerance" in err.message
    # YAML errors carry the line too; duplicate keys are errors, not silently the last one
    assert error_of(parse_policy, text.replace("max: 12", "max: [12"), "p.yaml").line == 10
    err = error_of(parse_policy, text.replace("max: 12", "max: 16\n      max: 8"), "p.yaml")
    assert (err.path, err.line, err.message) == ("spec.knobs.weight_bits.max", 10, "duplicate key 'max'")
    err = error_of(parse_policy, text.replace("max: 12", "max: 16\n      yes: 8"), "p.yaml")
    assert (err.path, err.line) == ("spec.knobs.weight_bits", 10) and "keys must be text" in err.message


def test_errors_in_included_files_name_the_file_they_come_from(tmp_path):
    write(tmp_path / "parent.yaml", policy_doc("parent", """\
        rules:
          - name: r
            when: "last(kv_usag) > 1"
            then: {set: {spec_length: 1}}
        """))
    write(tmp_path / "child.yaml", policy_doc("child", "mode: observe\n", include="[parent.yaml]"))
    err = error_of(load_policy, tmp_path / "child.yaml", [])
    assert (Path(err.file).name, err.path, err.line) == ("parent.yaml", "spec.rules[0].when", 7)
    # the child replacing the list takes the error away; a bad value the child writes is the child's
    write(tmp_path / "fixed.yaml", policy_doc("fixed", "rules: []\nknobs:\n  spec_length: {min: 0, max: 40, "
                                                        "controller: goodput}\n", include="[parent.yaml]"))
    err = error_of(load_policy, tmp_path / "fixed.yaml", [])
    assert (Path(err.file).name, err.path, err.line) == ("fixed.yaml", "spec.knobs.spec_length.max", 8)
    # an include that cannot be found is reported where it is written
    write(tmp_path / "lost.yaml", policy_doc("lost", include="[balanced, missing.yaml]"))
    err = error_of(load_policy, tmp_path / "lost.yaml", [])
    assert (Path(err.file).name, err.path, err.line) == ("lost.yaml", "include[1]", 4)
    assert "no such policy file" in err.message
    for odd in ['"a\\0b"', "x" * 300, '"x\\0.yaml"', "''"]:
        write(tmp_path / "odd.yaml", policy_doc("odd", include=f"[{odd}]"))
        assert error_of(load_policy, tmp_path / "odd.yaml", []).path == "include[0]"
    # every document names itself
    write(tmp_path / "anon.yaml", "include: [balanced]\nspec: {mode: observe}\n")
    err = error_of(load_policy, tmp_path / "anon.yaml", [])
    assert err.path == "apiVersion" and err.message == "required key missing"


# --- generated and mutated documents --------------------------------------------------------------------

_junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                  st.text(max_size=12), st.sampled_from(["30s", "800ms", "25%", "5m", "-1s", "rollback",
                                                         "goodput", "last(kv_usage) > 1", "optd/v1"]),
                  st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                           max_size=2))
_KEYS = ["min", "max", "controller", "for", "when", "then", "set", "increase", "spec_length",
         "kv_compression", "weight_bits", "max_batch_size", "rules", "knobs", "slo", "behavior", "up", "down",
         "name", "bogus"]


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw):
    base = yaml.safe_load((PRESETS_DIR / f"{draw(st.sampled_from(PRESETS))}.yaml").read_text())
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        kind = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if kind == "replace":
            parent[path[-1]] = draw(_junk)
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            new = draw(st.sampled_from(_KEYS))
            if kind == "rename":
                parent[new] = parent.pop(path[-1])
            else:
                parent[new] = draw(_junk)
        else:
            parent.append(draw(_junk))
    return doc


_knob_bodies = st.fixed_dictionaries(
    {"min": st.sampled_from([0, 1, 4, 8, 0.5, -1, 40]),
     "max": st.sampled_from([0, 4, 8, 16, 0.75, 128, 2000]),
     "controller": st.sampled_from(["goodput", "aimd", "rules", "builtin", "none", "magic"])},
    optional={"tolerance": st.sampled_from([0, 0.1, -1])})
_conditions = st.sampled_from(["last(kv_usage) > 0.9",
                               "avg(kv_usage, 30s) > 0.9 and last(requests_waiting) > 0",
                               "p95(itl_p95, 1m) > slo.itl_p95", "rate(preemptions_per_s, 5m) > 0",
                               "avg(kv_usage)", "last(foo) > 1", "kv_usage >", "import os"])
_actions = st.dictionaries(st.sampled_from(["set", "increase", "decrease", "bump"]),
                           st.dictionaries(st.sampled_from(["spec_length", "kv_compression", "weight_bits",
                                                            "max_batch_size", "nope"]),
                                           st.sampled_from([1, 2, 8, 0.25, 0, "25%", "150%", "x"]),
                                           max_size=2),
                           min_size=1, max_size=2)
_rules = st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "kv-pressure", ""]), "when": _conditions,
                                "then": _actions},
                               optional={"for": st.sampled_from(["15s", 0, "1m", "soon"]),
                                         "cooldown": st.sampled_from(["60s", 5, -1])})
_specs = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["enforce", "observe", "chaos"]),
    "evaluate_every": st.sampled_from(["5s", 1, "0s", "800ms", "fast"]),
    "slo": st.fixed_dictionaries({}, optional={"ttft_p95": st.sampled_from(["800ms", 1, 0, "x"]),
                                               "itl_p95": st.sampled_from(["60ms", 0.05]),
                                               "tpot": st.just(1)}),
    "guardrails": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["q", "q2"]), "when": _conditions,
                                                  "then": st.sampled_from(["rollback", "veto", "panic"])}),
                           max_size=2),
    "knobs": st.dictionaries(st.sampled_from(["spec_length", "kv_compression", "weight_bits",
                                              "max_batch_size", "temperature"]), _knob_bodies, max_size=3),
    "behavior": st.fixed_dictionaries({}, optional={
        "up": st.fixed_dictionaries({}, optional={"stabilization_window": st.sampled_from(["30s", -1]),
                                                  "max_step": st.sampled_from([2, 0, None])}),
        "down": st.just({"max_step": 1})}),
    "rules": st.lists(_rules, max_size=3),
})
_generated = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["optd/v1", "optd/v1", "v2"]),
     "kind": st.sampled_from(["Policy", "Policy", "X"]),
     "metadata": st.fixed_dictionaries({"name": st.sampled_from(["gen", "with space", "g-1"])}),
     "spec": _specs},
    optional={"include": st.sampled_from([[], ["balanced"], ["observe-only"], ["no-such-preset"]])})


def _check_outcome(doc) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    try:
        loaded = parse_policy(text, "gen.yaml", search_path=[])
    except PolicyError as e:
        assert e.errors and e.errors[0] is not None
        for err in e.errors:
            # an error may sit in an included preset (a child that breaks an inherited rule)
            source = text if err.file == "gen.yaml" else Path(err.file).read_text()
            assert err.file == "gen.yaml" or Path(err.file).parent == PRESETS_DIR
            assert isinstance(err.path, str) and err.message
            assert err.line is not None and 1 <= err.line <= source.count("\n") + 1
            assert err.path or err.message.startswith(("a policy must be", "empty document"))
        return
    assert parse_policy(loaded.text, search_path=[]).policy == loaded.policy


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_presets_load_or_fail_with_a_located_policy_error(doc):
    _check_outcome(doc)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_generated)
def test_generated_documents_load_or_fail_with_a_located_policy_error(doc):
    _check_outcome(doc)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mangled_yaml_text_loads_or_fails_with_a_policy_error(data):
    text = (PRESETS_DIR / "latency.yaml").read_text()
    pos = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 8))
    insert = data.draw(st.sampled_from(["", ":", "- ", "{", "]", "\n  ", "&a ", "*a", "<<: ", "'", "#",
                                        "\x00",
                                        "!!python/name:os.system ", "\t"]))
    try:
        parse_policy(text[:pos] + insert + text[pos + cut:], "m.yaml", search_path=[])
    except PolicyError as e:
        assert e.file == "m.yaml" and e.message
