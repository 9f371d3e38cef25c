"""`optd serve`: the engine, HTTP API, store, telemetry and metrics in one asyncio process.

Start-up: the schema is upgraded, the model loads (systemd is asked for more time while it does), then
READY=1. SIGTERM: STOPPING=1, stop accepting connections, let in-flight requests finish (up to
server.drain_timeout_s), flush the store, exit 0. SIGHUP: reload the configuration and the policy
(optd.daemon.reload). With a policy (config `policy:`, `--policy`, or later `PUT /v1/control/policy`) the
policy job turns the knobs (optd.daemon.policy_job); the quality probe runs at start, periodically and
after every change of a quality knob (optd.daemon.quality_probe).
The watchdog is fed from the event loop, and only while the engine thread is alive.
"""

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import uvicorn

from optd.daemon import db
from optd.daemon.app import create_app
from optd.daemon.config import ConfigError, DaemonConfig
from optd.daemon.control_api import ControlRoutes
from optd.daemon.devices import DeviceProbe
from optd.daemon.events import EventHub
from optd.daemon.load import start_demo_load
from optd.daemon.metrics import Metrics
from optd.daemon.mqtt import MqttBridge, http_url
from optd.daemon.policy_job import ActivePolicy, PolicyJob, slo_for
from optd.daemon.quality_probe import QualityProbe
from optd.daemon.reload import Reloader
from optd.daemon.request_log import FinishedBuffer, RequestLog
from optd.daemon.sdnotify import (
    READY,
    STOPPING,
    WATCHDOG,
    Notifier,
    extend_timeout,
    status,
    watchdog_interval,
)
from optd.daemon.state import control_token
from optd.daemon.store import Store
from optd.daemon.telemetry import SLO, RingBuffer, Sampler, TelemetryJob
from optd.engine import Engine
from optd.policies.errors import PolicyError
from optd.policies.loader import load_policy

log = logging.getLogger("optd.serve")
PRUNE_EVERY_S = 3600.0


def model_name(model: str) -> str:
    """What clients put in `model`: the bundled name, or the checkpoint folder's name."""
    return model if model in ("demo",) else Path(model).name


async def serve(config: DaemonConfig, state_dir: Path, demo: bool = False,
                load: Callable[[], DaemonConfig] | None = None) -> int:
    """`load` re-reads the configuration on SIGHUP (see optd.daemon.reload); None: nothing to re-read."""
    notifier = Notifier.from_env()
    notifier.notify(extend_timeout(900), status("upgrading the database and loading the model"))
    url = config.store.database_url(state_dir)
    await asyncio.to_thread(db.upgrade, url)
    policy = None
    if config.policy is not None:   # before the model loads: a bad policy is a bad config, found fast
        try:
            policy = await asyncio.to_thread(load_policy, config.policy)
        except PolicyError as e:
            raise ConfigError(f"policy: {e}") from None
    store = Store(url)
    engine_config = config.engine_config()
    engine_config.quality_cache_dir = str(state_dir / "quality")    # the probe's reference, kept
    engine = await asyncio.to_thread(Engine, engine_config)
    config_knobs = config.knobs.model_dump(exclude_none=True)
    applied = await asyncio.to_thread(engine.apply, **config_knobs)
    if not applied.ok:
        engine.shutdown()
        refused = [f"knobs.{o.name}: {o.reason}" for o in applied.outcomes.values() if o.status != "applied"]
        raise ConfigError("; ".join(refused))
    secret = config.server.control_token
    token = control_token(state_dir, secret.get_secret_value() if secret else None)
    metrics = Metrics(device=str(engine.device))
    ring = RingBuffer(config.telemetry.ring_buffer_s, config.telemetry.interval_s)
    hub = EventHub()
    control = ControlRoutes(engine, store, token, hub, config_knobs, ring=ring, metrics=metrics)
    await asyncio.to_thread(control.restore_pins)  # pins survive restarts
    # Finished requests go to the store, the latency histograms and, through `finished`, to goodput.
    finished = FinishedBuffer()
    requests = RequestLog(store=store, metrics=metrics, subscribers=[finished])
    app = create_app(engine, model_name(config.engine.model), config.server.max_waiting, metrics, control,
                     requests=requests)

    def publish(sample: dict) -> None:
        hub.publish("sample", sample)

    config_slo = SLO.from_config(config.slo)
    probe = QualityProbe(engine, config.telemetry.quality_probe_every_s)
    sampler = Sampler(engine.stats, lambda: engine.knobs, DeviceProbe(), slo=config_slo,
                      finished=finished.drain, quality=probe, spec_detail=True)

    def on_policy(active: ActivePolicy | None) -> None:
        sampler.slo = slo_for(active, config_slo)
        probe.set_interval(active.loaded.policy.spec.quality_probe_every if active is not None
                           else config.telemetry.quality_probe_every_s)

    policy_job = PolicyJob(control, ring, configured=config.policy, listeners=[on_policy], quality=probe)
    control.policy = policy_job
    if policy is not None:
        await asyncio.to_thread(policy_job.activate_configured, policy)
    else:  # a policy active before a restart without one is not running any more
        await asyncio.to_thread(policy_job.deactivate, "no policy configured")
    subscribers = [ring, store.add_sample, metrics.update_sample, publish]
    # The MQTT bridge (optional): its subscriber only queues the sample, never blocks the sampler.
    mqtt = None
    if config.mqtt.url is not None:
        mqtt = MqttBridge(config.mqtt, control, hub, model=model_name(config.engine.model), metrics=metrics)
        subscribers.append(mqtt.publish_sample)
    job = TelemetryJob(sampler, config.telemetry.interval_s, subscribers)
    server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                           log_level="info", lifespan="off",
                                           timeout_graceful_shutdown=int(config.server.drain_timeout_s)))
    server.install_signal_handlers = lambda: None  # ours below: systemd must hear STOPPING=1 first

    # `optd serve --demo`: a built-in load against our own port, once it listens.
    demo_load = start_demo_load(server) if demo else None

    def stop() -> None:
        if demo_load is not None:
            demo_load.cancel()  # before the drain: its requests would otherwise keep arriving
        notifier.notify(STOPPING, status("draining in-flight requests"))
        hub.close()  # open event streams would otherwise hold the drain until its timeout
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    reloader = Reloader(load or (lambda: config), config, notifier, control, app.state.openai, server,
                        policy=policy_job)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    job.start(loop)
    if mqtt is not None:
        mqtt.start()
    probe.start(loop)
    policy_job.start(loop)
    flush = _every(config.store.flush_interval_s, lambda: asyncio.to_thread(store.flush))
    expire = _every(1.0, lambda: asyncio.to_thread(control.expire_pins))
    # Retention, through the store's own (single writer) connection: old samples into one-minute
    # roll-ups, old request records deleted.
    prune = _every(PRUNE_EVERY_S,
                   lambda: asyncio.to_thread(store.prune, reloader.running.store.raw_retention_s))
    tasks = [asyncio.create_task(flush), asyncio.create_task(expire), asyncio.create_task(prune)]
    if (interval := watchdog_interval()) is not None:
        tasks.append(asyncio.create_task(_every(interval, lambda: _watchdog(notifier, engine))))
    ready = asyncio.create_task(_announce_ready(server, notifier, config, mqtt))
    try:
        await server.serve()
    finally:
        for task in [*tasks, ready]:
            task.cancel()
        job.shutdown()
        if mqtt is not None:
            await mqtt.stop()       # `offline`, retained, then a clean disconnect
        await policy_job.stop()     # both wait for engine work in flight: the engine stops next
        await probe.stop()
        store.close()  # flushes what is queued
        await asyncio.to_thread(engine.shutdown)
    return 0


async def _announce_ready(server: uvicorn.Server, notifier: Notifier, config: DaemonConfig,
                          mqtt: MqttBridge | None = None) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else config.server.port
    if mqtt is not None:            # the port may have been picked just now (--port 0)
        mqtt.set_http_url(http_url(config.server.host, port))
    log.info("serving %s on %s:%d", config.engine.model, config.server.host, port)
    notifier.notify(READY, status(f"serving {config.engine.model} on {config.server.host}:{port}"))


async def _watchdog(notifier: Notifier, engine: Engine) -> None:
    if engine.is_alive():
        notifier.notify(WATCHDOG)


async def _every(seconds: float, action) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # a failing periodic job is logged, and retried next time
            log.exception("periodic job failed")
