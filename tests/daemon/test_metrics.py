"""Prometheus metrics: names, types, labels and values as a scraper sees them (parsed exposition)."""

import math

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from optd.daemon.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Metrics
from optd.daemon.request_log import RequestLog, RequestTimer
from optd.engine import Delta, Engine, EngineConfig, EngineStats, Knobs, SamplingParams

COUNTERS = {  # exported sample name -> EngineStats field
    "optd_requests_finished_total": "requests_finished_total",
    "optd_prompt_tokens_total": "prompt_tokens_total",
    "optd_generation_tokens_total": "generation_tokens_total",
    "optd_preemptions_total": "preemptions_total",
    "optd_steps_total": "steps_total",
    "optd_spec_drafts_total": "spec_drafts_total",
    "optd_spec_draft_tokens_total": "spec_draft_tokens_total",
    "optd_spec_accepted_tokens_total": "spec_accepted_tokens_total",
}

FULL_SAMPLE = {
    "tokens_per_s": 120.0, "goodput_tokens_per_s": 100.0, "requests_per_s": 2.0,
    "ttft_p50": 0.1, "ttft_p95": 0.3, "ttft_p99": 0.5, "itl_p50": 0.01, "itl_p95": 0.02, "itl_p99": 0.03,
    "e2e_p95": 1.2, "requests_running": 5, "requests_waiting": 2, "preemptions_per_s": 0.0,
    "kv_usage": 0.625, "acceptance_rate": 0.7, "acceptance_length": 2.4, "quality_top1": 0.985,
    "quality_kl": 0.012, "gpu_memory_used_ratio": 0.81, "gpu_util": 0.93, "gpu_power_w": 412.5,
    "spec_length": 4, "kv_compression": 0.5, "weight_bits": 8.0, "max_batch_size": 32,
}


def scrape(m: Metrics) -> dict:
    """{family name: family} of the rendered text, as Prometheus would parse it."""
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict, sample_name: str, **labels) -> float:
    found = [s.value for f in families.values() for s in f.samples
             if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples"
    return found[0]


def exported(families: dict) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


def test_engine_snapshot_counters_and_gauges():
    stats = EngineStats(
        requests_running=3, requests_waiting=7, requests_finished_total=11, prompt_tokens_total=1300,
        generation_tokens_total=4200, preemptions_total=2, steps_total=900, kv_blocks_used=48,
        kv_blocks_total=64, kv_bytes_per_token=3072, kv_compression_achieved=0.5, weight_bytes=25_804_800,
        spec_drafts_total=500, spec_draft_tokens_total=2000, spec_accepted_tokens_total=1400,
        spec_accepted_per_pos=[450, 400, 330, 220], step_time_s={0: 0.012, 4: 0.019},
    )
    m = Metrics(device="cpu")
    m.update_engine(stats, Knobs(spec_length=4, kv_compression=0.5, weight_bits=8.0, max_batch_size=16))
    fams = scrape(m)

    for sample_name, field in COUNTERS.items():
        family = fams[sample_name.removesuffix("_total")]
        assert family.type == "counter"
        assert value(fams, sample_name) == getattr(stats, field)

    by_pos = fams["optd_spec_accepted_tokens_by_position"]
    assert by_pos.type == "counter"
    assert {s.labels["position"]: s.value for s in by_pos.samples} == {"1": 450, "2": 400, "3": 330, "4": 220}
    assert {s.labels["spec_length"]: s.value for s in fams["optd_decode_step_seconds"].samples} == {
        "0": 0.012, "4": 0.019}

    gauges = {
        "optd_requests_running": 3, "optd_requests_waiting": 7, "optd_kv_blocks_used": 48,
        "optd_kv_blocks_total": 64, "optd_kv_bytes_per_token": 3072, "optd_kv_usage_ratio": 0.75,
        "optd_kv_compression_achieved_ratio": 0.5, "optd_weight_bytes": 25_804_800,
        "optd_knob_spec_length": 4, "optd_knob_kv_compression": 0.5, "optd_knob_weight_bits": 8,
        "optd_knob_max_batch_size": 16,
    }
    for name, expected in gauges.items():
        assert fams[name].type == "gauge", name
        assert value(fams, name) == expected, name

    # A later snapshot replaces the values: counters follow the engine, never drift.
    m.update_engine(EngineStats(generation_tokens_total=5000, kv_blocks_total=64, kv_blocks_used=16), Knobs())
    fams = scrape(m)
    assert value(fams, "optd_generation_tokens_total") == 5000
    assert value(fams, "optd_kv_usage_ratio") == 0.25
    assert value(fams, "optd_knob_spec_length") == 0


def test_generation_tokens_match_a_real_engine():
    m = Metrics()
    with Engine(EngineConfig(model="demo", max_num_seqs=2)) as engine:
        outputs = engine.generate(["def main(", "import os\n"], SamplingParams(max_tokens=6))
        m.set_device(str(engine.device))
        stats = engine.stats()
        m.update_engine(stats, engine.knobs)
    for out in outputs:
        m.observe_request(out.ttft_s, [], out.e2e_s)
    m.observe_request(None, stats.itl_s, None)
    fams = scrape(m)

    generated = sum(len(o.token_ids) for o in outputs)
    assert generated > 0
    assert value(fams, "optd_generation_tokens_total") == stats.generation_tokens_total == generated
    assert value(fams, "optd_requests_finished_total") == 2
    assert value(fams, "optd_prompt_tokens_total") == sum(len(o.prompt_token_ids) for o in outputs)
    assert value(fams, "optd_steps_total") == stats.steps_total > 0
    assert value(fams, "optd_requests_running") == 0
    assert value(fams, "optd_knob_max_batch_size") == 2
    assert value(fams, "optd_kv_blocks_total") == stats.kv_blocks_total > 0
    assert value(fams, "optd_time_to_first_token_seconds_count") == 2
    assert value(fams, "optd_e2e_request_latency_seconds_count") == 2
    assert value(fams, "optd_inter_token_latency_seconds_count") == len(stats.itl_s)
    assert fams["optd_build_info"].samples[0].labels["device"] == str(engine.device)


def test_latency_histograms_bucket_counts():
    m = Metrics()
    m.observe_request(0.05, [0.004, 0.012, 0.012, 0.2], 0.9)
    m.observe_request(0.7, [0.03], 4.0)
    m.observe_request(None, [float("nan")], float("inf"))  # aborted before its first token: skipped
    fams = scrape(m)

    for name, buckets in [("optd_time_to_first_token_seconds", TTFT_BUCKETS),
                          ("optd_inter_token_latency_seconds", ITL_BUCKETS),
                          ("optd_e2e_request_latency_seconds", E2E_BUCKETS)]:
        assert fams[name].type == "histogram"
        les = [s.labels["le"] for s in fams[name].samples if s.name == name + "_bucket"]
        assert les == [*(str(float(b)) for b in buckets), "+Inf"]

    def bucket(name: str, le: float | str) -> float:
        return value(fams, name + "_bucket", le=str(float(le)) if le != "+Inf" else le)

    ttft = "optd_time_to_first_token_seconds"
    assert [bucket(ttft, le) for le in (0.04, 0.06, 0.6, 0.8, "+Inf")] == [0, 1, 1, 2, 2]
    assert value(fams, ttft + "_count") == 2
    assert value(fams, ttft + "_sum") == pytest.approx(0.75)

    itl = "optd_inter_token_latency_seconds"
    assert [bucket(itl, le) for le in (0.0025, 0.005, 0.01, 0.015, 0.03, 0.15, 0.2, "+Inf")] == [
        0, 1, 1, 3, 4, 4, 5, 5]
    assert value(fams, itl + "_count") == 5
    assert value(fams, itl + "_sum") == pytest.approx(0.258)

    e2e = "optd_e2e_request_latency_seconds"
    assert [bucket(e2e, le) for le in (0.5, 1.0, 3.0, 5.0, "+Inf")] == [0, 1, 1, 2, 2]
    assert value(fams, e2e + "_count") == 2


def test_the_request_log_feeds_the_histograms_with_ok_requests_only(caplog):
    m = Metrics()
    broken_calls = []

    def broken(request):
        broken_calls.append(request.request_id)
        raise RuntimeError("subscriber bug")

    log = RequestLog(metrics=m, subscribers=[broken])
    clock = iter([0.0, 0.05, 0.07, 0.08, 0.3]).__next__      # arrival, 3 tokens, end
    timer = RequestTimer("chat", clock=clock, wall=lambda: 1000.0)
    timer.request_id = "chatcmpl-1"
    for _ in range(3):
        timer.on_delta(Delta("c", "x", [7], prompt_tokens=4))
    ok = timer.finish("ok", "length", completion_tokens=3)
    assert (ok.ttft_s, ok.itl_s, ok.e2e_s, ok.prompt_tokens) == (0.05, pytest.approx((0.02, 0.01)), 0.3, 4)
    assert (ok.itl_mean_s, ok.itl_max_s, ok.arrival, ok.finished_at) == (pytest.approx(0.015),
                                                                         pytest.approx(0.02), 1000.0, 1000.3)
    log.record(ok)
    for status in ("aborted", "error", "rejected"):
        t = RequestTimer("completions", clock=iter([0.0, 0.1, 0.5, 0.9]).__next__)
        t.request_id = f"cmpl-{status}"
        t.on_delta(Delta("c", "x", [7, 8]))          # two tokens in one delta: one gap of 0
        t.on_delta(Delta("c", "y", [9]))
        log.record(t.finish(status, None))
    fams = scrape(m)
    assert value(fams, "optd_time_to_first_token_seconds_count") == 1
    assert value(fams, "optd_time_to_first_token_seconds_sum") == pytest.approx(0.05)
    assert value(fams, "optd_inter_token_latency_seconds_count") == 2
    assert value(fams, "optd_e2e_request_latency_seconds_count") == 1
    assert value(fams, "optd_e2e_request_latency_seconds_sum") == pytest.approx(0.3)
    # A failing consumer is logged and counted; the others still get every request.
    assert broken_calls == ["chatcmpl-1", "cmpl-aborted", "cmpl-error", "cmpl-rejected"]
    assert log.errors == 4 and log.recorded == 4
    assert "subscriber bug" in caplog.text
    with pytest.raises(ValueError, match="endpoint must be one of completions, chat"):
        RequestTimer("embeddings")


def test_sample_gauges_and_missing_fields():
    m = Metrics()
    fams = scrape(m)  # nothing fed yet: no engine counters, no sample gauges, still a valid render
    assert "optd_generation_tokens_total" not in exported(fams)
    assert "optd_kv_usage_ratio" not in exported(fams)
    assert value(fams, "optd_build_info", **fams["optd_build_info"].samples[0].labels) == 1

    m.update_sample(FULL_SAMPLE)
    fams = scrape(m)
    expected = {
        "optd_requests_running": 5, "optd_requests_waiting": 2, "optd_kv_usage_ratio": 0.625,
        "optd_spec_acceptance_rate": 0.7, "optd_spec_acceptance_length": 2.4, "optd_quality_top1": 0.985,
        "optd_quality_kl": 0.012, "optd_gpu_memory_used_ratio": 0.81, "optd_gpu_utilization_ratio": 0.93,
        "optd_gpu_power_watts": 412.5, "optd_knob_spec_length": 4, "optd_knob_kv_compression": 0.5,
        "optd_knob_weight_bits": 8, "optd_knob_max_batch_size": 32,
    }
    for name, v in expected.items():
        assert fams[name].type == "gauge", name
        assert value(fams, name) == v, name

    # A CPU sample: no quality probe run yet, no device power or utilization; NaN/None count as absent.
    m.update_engine(EngineStats(requests_running=1, kv_blocks_total=10, kv_blocks_used=5), Knobs())
    cpu = {k: v for k, v in FULL_SAMPLE.items()
           if k not in ("quality_top1", "gpu_util", "gpu_power_w", "kv_usage", "requests_running")}
    cpu |= {"quality_kl": None, "acceptance_rate": float("nan"), "gpu_memory_used_ratio": "n/a"}
    m.update_sample(cpu)
    fams = scrape(m)
    names = exported(fams)
    for gone in ("optd_quality_top1", "optd_quality_kl", "optd_spec_acceptance_rate",
                 "optd_gpu_utilization_ratio", "optd_gpu_power_watts", "optd_gpu_memory_used_ratio"):
        assert gone not in names, gone
        assert gone not in fams, gone
    assert value(fams, "optd_spec_acceptance_length") == 2.4
    # Gauges the engine snapshot also sets keep the engine's value when the sample lacks them.
    assert value(fams, "optd_requests_running") == 1
    assert value(fams, "optd_kv_usage_ratio") == 0.5
    assert value(fams, "optd_requests_waiting") == 2  # the sample came last: it wins
    assert value(fams, "optd_knob_max_batch_size") == 32
    assert not any(math.isnan(s.value) for f in fams.values() for s in f.samples)


def test_decisions_by_knob_and_outcome():
    m = Metrics()
    fams = scrape(m)
    assert fams["optd_decisions"].type == "counter"
    zero = [s for s in fams["optd_decisions"].samples if s.name == "optd_decisions_total"]
    assert {(s.labels["knob"], s.labels["outcome"]) for s in zero} == {
        (k, o) for k in Knobs.names() for o in ("applied", "rejected", "rolled_back")}
    assert all(s.value == 0 and set(s.labels) == {"knob", "outcome"} for s in zero)

    m.record_decision("spec_length", "applied")
    m.record_decision("spec_length", "applied")
    m.record_decision("max_batch_size", "rejected")
    m.record_decision("kv_compression", "observed")
    fams = scrape(m)
    assert value(fams, "optd_decisions_total", knob="spec_length", outcome="applied") == 2
    assert value(fams, "optd_decisions_total", knob="max_batch_size", outcome="rejected") == 1
    assert value(fams, "optd_decisions_total", knob="kv_compression", outcome="observed") == 1
    assert value(fams, "optd_decisions_total", knob="weight_bits", outcome="rolled_back") == 0


def test_build_info():
    m = Metrics(device="cuda:0", version="9.9.9")
    fams = scrape(m)
    (sample,) = fams["optd_build_info"].samples
    assert fams["optd_build_info"].type == "gauge"
    assert set(sample.labels) == {"version", "python", "torch", "device"}
    assert sample.labels["version"] == "9.9.9" and sample.labels["device"] == "cuda:0"
    assert sample.labels["torch"] != "" and sample.labels["python"].count(".") == 2
    assert sample.value == 1
    import optd
    assert scrape(Metrics()).get("optd_build_info").samples[0].labels["version"] == optd.__version__


def test_two_instances_do_not_collide():
    a, b = Metrics(device="a"), Metrics(device="b")
    a.update_engine(EngineStats(generation_tokens_total=10), Knobs())
    b.update_engine(EngineStats(generation_tokens_total=20), Knobs(max_batch_size=8))
    a.observe_request(0.1, [0.01], 0.2)
    b.record_decision("spec_length", "applied")
    fa, fb = scrape(a), scrape(b)
    assert value(fa, "optd_generation_tokens_total") == 10
    assert value(fb, "optd_generation_tokens_total") == 20
    assert value(fa, "optd_time_to_first_token_seconds_count") == 1
    assert value(fb, "optd_time_to_first_token_seconds_count") == 0
    assert value(fa, "optd_decisions_total", knob="spec_length", outcome="applied") == 0
    assert value(fb, "optd_decisions_total", knob="spec_length", outcome="applied") == 1
    assert value(fb, "optd_knob_max_batch_size") == 8
    assert not any(name.startswith("optd_") for name in REGISTRY._names_to_collectors)


def test_naming_conventions_and_render_formats():
    m = Metrics()
    m.update_engine(EngineStats(kv_blocks_total=4, spec_accepted_per_pos=[1]), Knobs())
    m.update_sample(FULL_SAMPLE)
    fams = scrape(m)
    assert all(name.startswith("optd_") for name in fams)
    for f in fams.values():
        for s in f.samples:
            if f.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
    design = {"optd_time_to_first_token_seconds", "optd_inter_token_latency_seconds",
              "optd_e2e_request_latency_seconds", "optd_decisions", "optd_build_info",
              "optd_requests_running", "optd_requests_waiting", "optd_kv_usage_ratio",
              "optd_spec_acceptance_rate", "optd_quality_top1", "optd_quality_kl"}
    assert design <= set(fams)

    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, content_type = m.render("text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"optd_generation_tokens_total 0.0" in body
