"""The Ray Serve app: an OpenAI-compatible HTTP API, one engine per replica.

    raytp serve --model DIR --tp 2            # or: serve.run(build_app(engine_cfg, serve_cfg))
    curl localhost:8000/v1/completions -d '{"model": "DIR-name", "prompt": "Hello"}'

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings,
GET /v1/models, POST /tokenize and POST /detokenize (vLLM's; with --api-key, all these need
`Authorization: Bearer <key>`),
GET /health (200, or 503 once the engine died), GET /metrics (Prometheus text).

A replica's engine steps in its own actor beside it (`raytp-core-<id>`,
driver/engine_core.py), which places the TP workers in their own placement group: the Ray
dashboard shows the replica, its core, and one `raytp-<engine>-tp<rank>` actor per shard.
A dead worker or core fails Serve's health check, and Serve replaces the replica (its core
and workers go with it) with a fresh engine.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations as types.

import logging
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from driver.async_engine import AsyncLLMEngine
from driver.config import EngineConfig, ServeConfig
from driver.openai_protocol import APIError
from driver.openai_serving import OpenAIServing

logger = logging.getLogger("raytp.serve")
app = FastAPI(title="raytp", description="OpenAI-compatible API of a raytp engine")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as e:
        raise APIError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
        raise APIError("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                       "server's --api-key", status=401, code="invalid_api_key")


def served_name(config: EngineConfig) -> str:
    """The `model` clients send by default: the checkpoint directory's name."""
    return os.path.basename(os.path.normpath(config.model.model))


# serve.ingress pickles the class as it is defined: what its methods use is defined above.
@serve.deployment(name="raytp", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, engine_config: EngineConfig, serve_config: ServeConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = AsyncLLMEngine(engine_config, serve_config.max_num_requests)
        name = serve_config.served_model_name or served_name(engine_config)
        tool_parser = serve_config.tool_call_parser if serve_config.enable_auto_tool_choice else None
        self.api = OpenAIServing(self.engine, name, serve_config.stream_interval, tool_parser,
                                 serve_config.lora_modules, serve_config.reasoning_parser,
                                 serve_config.chat_template, serve_config.generation_config)
        self.api_key = serve_config.api_key
        logger.info("serving %r (tp=%d, %s) as %r", engine_config.model.model,
                    engine_config.parallel.tensor_parallel_size, engine_config.parallel.device, name)

    @app.get("/health")
    async def health(self) -> Response:
        if self.engine.dead is not None:
            return _error(APIError(f"the engine stopped: {self.engine.dead}", 503, "server_error"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            _check_key(request, self.api_key)
        except APIError as e:
            return _error(e)
        return JSONResponse(self.api.models())

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._respond(request, self.api.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._respond(request, self.api.chat_completions)

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self._respond(request, self.api.responses)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._respond(request, self.api.embeddings)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._respond(request, self.api.tokenize)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._respond(request, self.api.detokenize)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        lines = []
        for key, value in (await self.engine.stats()).items():
            kind = "counter" if key.endswith("_total") else "gauge"
            lines += [f"# TYPE raytp_{key} {kind}", f"raytp_{key} {value}"]
        lines += self.engine.metrics.prometheus("raytp_")
        return PlainTextResponse("\n".join(lines) + "\n")

    async def _respond(self, request: Request, handler) -> Response:
        try:
            _check_key(request, self.api_key)
            result = await handler(await _json_body(request))
        except APIError as e:
            return _error(e)
        except Exception as e:  # a bug of ours: still an OpenAI-shaped 500, and a traceback in the log
            logger.exception("request failed")
            return _error(APIError(f"internal error: {type(e).__name__}: {e}", 500, "server_error"))
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    def check_health(self) -> None:
        """Serve's periodic check: a dead engine gets this replica replaced."""
        if self.engine.dead is not None:
            raise RuntimeError(f"the engine stopped: {self.engine.dead}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def check_lora_modules(engine_config: EngineConfig, serve_config: ServeConfig) -> None:
    """Adapters the engine cannot serve fail the deployment, not each request later."""
    from driver.lora import check_adapter

    modules, lora = serve_config.lora_modules or {}, engine_config.lora
    if modules and not lora.enable_lora:
        raise ValueError("--lora-modules needs an engine with LoRA on: add --enable-lora")
    for path in modules.values():
        check_adapter(path, lora.max_lora_rank)


def build_app(engine_config: EngineConfig, serve_config: ServeConfig):
    """The bound app for serve.run(): Serve queues no more than the engine accepts, so a
    request over the limit gets the engine's quick 503 rather than waiting in a queue."""
    check_lora_modules(engine_config, serve_config)
    replicas = ({"autoscaling_config": dict(serve_config.autoscaling_config)} if serve_config.autoscaling_config
                else {"num_replicas": serve_config.num_replicas})
    return OpenAIServer.options(
        **replicas,
        max_ongoing_requests=serve_config.max_num_requests + 16,
        ray_actor_options={"num_cpus": serve_config.replica_num_cpus},
    ).bind(engine_config, serve_config)


def run(engine_config: EngineConfig, serve_config: ServeConfig, blocking: bool = True):
    """Start Serve's proxy on host:port (on the running Ray cluster, or a new local one) and
    deploy the app at /. Returns the app's handle when not blocking."""
    from executor.ray_executor import _init_ray

    _init_ray(engine_config.parallel.ray_address)
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    handle = serve.run(build_app(engine_config, serve_config), name="raytp", route_prefix="/",
                       blocking=blocking)
    return handle


__all__ = ["OpenAIServer", "build_app", "run", "served_name", "app"]
