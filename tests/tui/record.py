"""Record a running daemon's answers for the snapshot tests (test_snapshots.py):

    python -m tests.tui.record http://127.0.0.1:PORT > tests/tui/data/recorded.json

Status, server info, policy, the last 60 s of telemetry (the fields of DESIGN.md's sample only, to keep
the file small) and the latest 40 decisions, with the time they were read as `now`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from optd.tui.client import DaemonClient

SAMPLE_FIELDS = {
    "ts", "tokens_per_s", "goodput_tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p95", "ttft_p99",
    "itl_p50", "itl_p95", "itl_p99", "e2e_p95", "requests_running", "requests_waiting", "preemptions_per_s",
    "kv_usage", "acceptance_rate", "acceptance_length", "quality_top1", "quality_kl",
    "gpu_memory_used_ratio", "gpu_util", "gpu_power_w", "spec_length", "kv_compression", "weight_bits",
    "max_batch_size"}


async def record(url: str) -> dict:
    client = DaemonClient(url)
    try:
        http = client._http                       # the raw JSON, as the daemon sent it
        now = time.time()
        answers = {}
        for key, path in (("status", "/v1/control/status"), ("policy", "/v1/control/policy"),
                          ("decisions", "/v1/control/decisions?limit=40"),
                          ("telemetry", "/v1/control/telemetry?seconds=60")):
            answers[key] = (await http.get(path)).json()
        answers["telemetry"]["samples"] = [{k: v for k, v in s.items() if k in SAMPLE_FIELDS}
                                           for s in answers["telemetry"]["samples"]]
        answers["info"] = (await client.info()).model_dump()
        return {"now": now, **answers}
    finally:
        await client.aclose()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(record(sys.argv[1])), indent=1))
