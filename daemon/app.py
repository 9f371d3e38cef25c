"""The HTTP application: the OpenAI-compatible API, health and readiness, Prometheus metrics."""

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from optd.daemon.control_api import ControlRoutes
from optd.daemon.metrics import Metrics
from optd.daemon.openai_api import OpenAIRoutes
from optd.daemon.request_log import RequestLog
from optd.engine import Engine


def create_app(engine: Engine, model_name: str, max_waiting: int, metrics: Metrics,
               control: ControlRoutes | None = None, requests: RequestLog | None = None) -> FastAPI:
    """`requests` receives every finished request; by default one feeding only `metrics`' histograms."""
    app = FastAPI(title="optd", docs_url=None, redoc_url=None)
    requests = requests if requests is not None else RequestLog(metrics=metrics)
    # Kept on app.state: a SIGHUP reload changes its max_waiting (optd.daemon.reload).
    app.state.openai = OpenAIRoutes(engine, model_name, max_waiting, requests=requests)
    app.include_router(app.state.openai.router)
    if control is not None:
        app.include_router(control.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    @app.get("/ready")
    async def ready() -> JSONResponse:  # the engine is built (model loaded) before the app exists
        return await health()

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        metrics.update_engine(engine.stats(), engine.knobs)
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
