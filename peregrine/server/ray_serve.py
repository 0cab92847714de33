"""Engine replicas on Ray Serve behind one OpenAI-compatible ingress.

Each replica runs `peregrine serve`'s own FastAPI app (routes, validation, errors, engine) in
its process; the ingress hands every HTTP request to a replica chosen by the prefix-aware
router and relays the response, sending it to another replica when its replica died before
answering. `app` is the application builder for `serve run` and Serve config files;
`peregrine serve --ray` calls `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message, Receive, Scope, Send

import peregrine
from peregrine.config import EngineConfig
from peregrine.server.app import ServerState, create_app
from peregrine.server.args import ServerArgs
from peregrine.server.asgi_call import ForwardedRequest, call_app
from peregrine.server.errors import error_response
from peregrine.server.limits import BodySizeLimit
from peregrine.server.metrics import CONTENT_TYPE, ServerMetrics
from peregrine.server.prefix_routing import prefix_hashes, prompt_text
from peregrine.server.ray_args import RayArgs
from peregrine.server.ray_router import PREFIX_KWARG, REPLICA_KWARG, PrefixAwareRouter
from peregrine.server.router_registry import live_replicas, routing_counts
from peregrine.server.relay import broken_stream_event, carries_output, is_event_stream
from peregrine.server.replica_metrics import merge_replica_metrics

logger = logging.getLogger("peregrine.server.ray")

APP_NAME = "peregrine"
REPLICA = "PeregrineReplica"
INGRESS = "PeregrineIngress"
REPLICA_HEADER = b"x-peregrine-replica"
# A replica that died (killed, out of memory, its node gone) or that Serve could not reach.
REPLICA_GONE = (RayActorError, RayServeException)
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses",
                "/tokenize")


class EngineReplica:
    """One engine and the server's routes around it, answering forwarded HTTP requests."""

    async def __init__(self, server_args: ServerArgs, config: EngineConfig) -> None:
        self.app = create_app(server_args, config)
        self.state: ServerState = self.app.state.peregrine
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        # Serve routes to a replica once its constructor returns: only once it is loaded.
        await asyncio.to_thread(self.state.engine.wait_ready, None)

    async def handle(self, request: ForwardedRequest, prefix: list[int] | None = None
                     ) -> AsyncIterator[Message]:
        """The response's ASGI messages (`prefix` is for the router), the start naming this
        replica in an `x-peregrine-replica` header."""
        async for message in call_app(self.app, request):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []),
                           (REPLICA_HEADER, self.replica_id().encode())]
                message = {**message, "headers": headers}
            yield message

    def metrics(self, replica: str | None = None) -> bytes:
        """This replica's Prometheus exposition (`replica` is for the router)."""
        return ServerMetrics.render_all(s.metrics for s in self.state.router.slots)

    def replica_id(self) -> str:
        """This replica's unique id, the `replica` label of its metrics."""
        return serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine failed is replaced."""
        engine = self.state.engine
        if engine.load_error is not None:
            raise RuntimeError(f"the model failed to load: {engine.load_error}")

    async def __del__(self) -> None:
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.__aexit__(None, None, None)


class _Relayed(Response):
    """A response relayed from a replica: its start and the body chunks already received,
    then the rest of its stream; a replica dying mid-stream ends the stream with an error
    event (SSE) or cuts it (anything else)."""

    def __init__(self, ingress: "Ingress", path: str, start: Message, held: list[Message],
                 stream: DeploymentResponseGenerator | None) -> None:
        super().__init__(status_code=start["status"])
        self.ingress, self.path, self.start, self.held, self.stream = (ingress, path, start,
                                                                         held, stream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(self.start)
            for message in self.held:
                await send(message)
            if self.stream is None:
                return
            try:
                async for message in self.stream:
                    if message["type"] == "http.response.body":
                        await send(message)
            except Exception as e:  # noqa: BLE001 - the stream ends, with a reason if SSE
                if isinstance(e, REPLICA_GONE):
                    self.ingress.broken.inc()
                    reason = ("the replica serving this stream died after it had started; "
                              "retry the request")
                else:
                    reason = f"relaying the stream failed: {type(e).__name__}: {e}"
                logger.warning("response to %s cut short: %s", self.path, e)
                end = b""
                if is_event_stream(self.start.get("headers", [])):
                    end = broken_stream_event(self.path, reason)
                await send({"type": "http.response.body", "body": end, "more_body": False})
        finally:
            if self.stream is not None:
                self.stream.cancel()  # the client left: stop the replica's work too


class Ingress:
    """The HTTP front: forwards requests to engine replicas, retries on a replica's death,
    and serves every replica's metrics at /metrics."""

    def __init__(self, replicas: DeploymentHandle, server_args: ServerArgs,
                 ray_args: RayArgs) -> None:
        self.replicas = replicas
        self.args = server_args
        self.ray_args = ray_args
        self.app_name = serve.get_replica_context().app_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.retried = Counter("peregrine:ray_requests_retried", "Requests sent to another "
                               "replica because theirs died before answering.",
                               registry=self.registry)
        self.failed = Counter("peregrine:ray_requests_failed", "Requests answered 503: "
                              "their replicas died more than --max-retries times.",
                              registry=self.registry)
        self.broken = Counter("peregrine:ray_streams_broken", "Streams ended with an error "
                              "event: their replica died after the first token.",
                              registry=self.registry)
        self.replica_count = Gauge("peregrine:ray_replicas", "Replicas the ingress can reach.",
                                   registry=self.registry)
        self.routed = Gauge("peregrine:ray_prefix_routed", "Requests with a prompt prefix "
                            "the router placed.", registry=self.registry)
        self.affine = Gauge("peregrine:ray_prefix_affinity", "Of those, requests sent to the "
                            "replica that had served their prefix.", registry=self.registry)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The ingress's HTTP app (Serve calls it after the constructor)."""
        app = FastAPI(title="peregrine", version=peregrine.__version__, docs_url=None,
                      redoc_url=None, openapi_url=None)  # the replicas serve the docs
        app.add_middleware(BodySizeLimit, max_bytes=self.args.max_request_bytes)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(await self.metrics(), media_type=CONTENT_TYPE)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                                "HEAD", "OPTIONS"])
        async def forward(request: Request) -> Response:
            return await self.forward(request)

        return app

    def _hashes(self, request: ForwardedRequest) -> list[int] | None:
        if request.method != "POST" or not request.path.startswith(ROUTED_PATHS):
            return None
        try:
            body = json.loads(request.body)
        except ValueError:
            return None  # the replica answers the 400
        text = prompt_text(body) if isinstance(body, dict) else None
        if not text:
            return None
        return prefix_hashes(text, self.ray_args.route_block_chars,
                             self.ray_args.route_max_blocks)

    async def forward(self, request: Request) -> Response:
        """Send the request to a replica and relay its answer; until the replica has given
        the client anything (a stream: its first token), a replica's death sends the request
        to another one."""
        scope = request.scope
        fwd = ForwardedRequest(request.method, scope["path"], scope.get("query_string", b""),
                               list(scope.get("headers", [])), await request.body(),
                               tuple(scope["client"]) if scope.get("client") else None)
        hashes = self._hashes(fwd)
        kwargs = {PREFIX_KWARG: hashes} if hashes else {}
        for attempt in range(self.ray_args.max_retries + 1):
            stream = self.replicas.options(stream=True, method_name="handle").remote(
                fwd, **kwargs)
            try:
                start, held, finished = await self._first_output(stream)
            except BackPressureError as e:
                stream.cancel()
                return error_response(HTTPStatus.SERVICE_UNAVAILABLE, f"every replica's "
                                      f"queue is full: {e}", code="overloaded",
                                      headers={"Retry-After": "1"})
            except REPLICA_GONE as e:
                stream.cancel()
                logger.warning("replica died before answering %s %s (attempt %d): %s",
                               fwd.method, fwd.path, attempt + 1, e)
                if attempt < self.ray_args.max_retries:
                    self.retried.inc()
                    # Give Serve a moment to drop the dead replica from the handle's set.
                    await asyncio.sleep(0.05 * 2 ** attempt)
                continue
            except Exception as e:  # noqa: BLE001 - one request fails, in OpenAI's shape
                stream.cancel()
                logger.exception("forwarding %s %s failed", fwd.method, fwd.path)
                return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: "
                                      f"{type(e).__name__}: {e}", code="internal_error")
            except BaseException:  # cancelled: the client went away
                stream.cancel()
                raise
            return _Relayed(self, fwd.path, start, held, None if finished else stream)
        self.failed.inc()
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, f"the replicas serving this "
                              f"request died {self.ray_args.max_retries + 1} times",
                              code="replica_unavailable", headers={"Retry-After": "1"})

    @staticmethod
    async def _first_output(stream: DeploymentResponseGenerator
                            ) -> tuple[Message, list[Message], bool]:
        """(start, body chunks, whether that was all) once the response has given the client
        something: its whole body, or a streamed chunk beyond a chat stream's role chunk."""
        start: Message | None = None
        held: list[Message] = []
        async for message in stream:
            if message["type"] == "http.response.start":
                start = message
                continue
            held.append(message)
            if not message.get("more_body", False):
                break
            if not is_event_stream(start["headers"] if start else []) \
                    or carries_output(message.get("body", b"")):
                assert start is not None
                return start, held, False
        assert start is not None, "the replica's app sent no response"
        if not held or held[-1].get("more_body", False):
            held.append({"type": "http.response.body", "body": b"", "more_body": False})
        return start, held, True

    async def metrics(self) -> bytes:
        """Every reachable replica's metrics, labelled `replica`, and the ingress's own."""
        ids = live_replicas(self.app_name, REPLICA)
        self.replica_count.set(len(ids))
        routed, affine = routing_counts(self.app_name, REPLICA)
        self.routed.set(routed)
        self.affine.set(affine)

        async def one(uid: str) -> bytes | None:
            call = self.replicas.options(method_name="metrics").remote(**{REPLICA_KWARG: uid})
            try:
                return await asyncio.wait_for(call, 10.0)
            except (asyncio.TimeoutError, *REPLICA_GONE) as e:
                call.cancel()
                logger.warning("no metrics from replica %s: %s", uid, e)
                return None

        texts = await asyncio.gather(*(one(uid) for uid in ids))
        merged = merge_replica_metrics({uid: t for uid, t in zip(ids, texts) if t is not None})
        return merged + generate_latest(self.registry)


# --- building the application -------------------------------------------------------------------
def _coerce(cls: type, name: str, value: Any) -> Any:
    """A value given as text (`serve run ... num_replicas=2`) as the field's type."""
    if not isinstance(value, str):
        return value
    hint = typing.get_type_hints(cls)[name]
    kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if value.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    for kind in kinds:
        if kind is bool:
            if value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
        elif kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def split_args(args: Mapping[str, Any]) -> tuple[ServerArgs, EngineConfig, RayArgs]:
    """A Serve config's `args` (any `peregrine serve` flag, dashes or underscores; text is
    read as the flag's type) as the server's, the engine's and the replicas' options;
    unknown names are refused."""
    given = {k.replace("-", "_"): v for k, v in args.items()}
    fields = {cls: set(cls.__dataclass_fields__) for cls in (ServerArgs, RayArgs, EngineConfig)}
    fields[EngineConfig] -= {"extra"}
    unknown = sorted(set(given) - set().union(*fields.values()))
    if unknown:
        raise ValueError(f"unknown peregrine serve options: {', '.join(unknown)}")

    def part(cls: type) -> dict[str, Any]:
        return {k: _coerce(cls, k, v) for k, v in given.items() if k in fields[cls]}
    return ServerArgs(**part(ServerArgs)), EngineConfig(**part(EngineConfig)), \
        RayArgs(**part(RayArgs))


def replica_options(server_args: ServerArgs, config: EngineConfig, ray_args: RayArgs
                    ) -> dict[str, Any]:
    """The replicas deployment's Serve options: resources, scaling, routing."""
    if ray_args.autoscaling:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": ray_args.min_replicas, "max_replicas": ray_args.max_replicas,
            "initial_replicas": ray_args.num_replicas,
            "target_ongoing_requests": ray_args.target_ongoing_requests,
            "upscale_delay_s": ray_args.upscale_delay_s,
            "downscale_delay_s": ray_args.downscale_delay_s}}
    else:
        scaling = {"num_replicas": ray_args.num_replicas}
    router = RequestRouterConfig(
        # By import path: Serve imports it in every process holding a handle.
        request_router_class=f"{PrefixAwareRouter.__module__}.{PrefixAwareRouter.__name__}",
        request_router_kwargs={"affinity": ray_args.ray_router == "prefix",
                               "max_imbalance": ray_args.route_max_imbalance})
    threads = str(config.num_threads or 1)
    return {"name": REPLICA,
            "ray_actor_options": {"num_cpus": ray_args.replica_cpus,
                                  "num_gpus": ray_args.replica_gpus,
                                  "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads}}},
            "max_ongoing_requests": ray_args.max_ongoing_requests or config.max_num_seqs,
            "request_router_config": router,
            "graceful_shutdown_timeout_s": server_args.shutdown_timeout, **scaling}


def build(server_args: ServerArgs, config: EngineConfig, ray_args: RayArgs
          ) -> serve.Application:
    """The Serve application: the replicas deployment and the ingress bound to it."""
    if config.num_threads is None and ray_args.replica_cpus >= 1:
        # Without this every replica would take all the machine's cores and contend.
        config = dataclasses.replace(config, num_threads=int(ray_args.replica_cpus))
    replicas = serve.deployment(EngineReplica,
                                **replica_options(server_args, config, ray_args))
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS,
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return ingress.bind(replicas.bind(server_args, config), server_args, ray_args)


def app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """The application builder behind `serve run peregrine.server.ray_serve:app` and a Serve
    config's `import_path`; `args` are `peregrine serve` options."""
    return build(*split_args(dict(args or {})))


# --- `peregrine serve --ray` --------------------------------------------------------------------
def run(ns: argparse.Namespace, config: EngineConfig) -> int:
    """Deploy on Ray and serve until Ctrl-C / SIGTERM; returns the process exit status."""
    server_args = ServerArgs.from_namespace(ns)
    ray_args = RayArgs.from_namespace(ns)
    application = build(server_args, config, ray_args)
    address = ray_args.ray_address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.INFO if ns.verbose else logging.WARNING,
                 log_to_driver=bool(ns.verbose))
    if address is None:  # a cluster of its own, torn down with this process
        ray.init(address="local", include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    scaled = (f"{ray_args.min_replicas}..{ray_args.max_replicas} replicas (autoscaling)"
              if ray_args.autoscaling else f"{ray_args.num_replicas} replica(s)")
    print(f"peregrine: deploying {scaled} on Ray "
          f"({address or 'a new local cluster'}) ...", flush=True)
    try:
        serve.start(http_options={"host": server_args.host, "port": server_args.port})
        serve.run(application, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - a failed deployment is reported, not a traceback
        print(f"peregrine: error: the deployment failed: {e}", file=sys.stderr, flush=True)
        _stop()
        return 2
    host = "127.0.0.1" if server_args.host in ("0.0.0.0", "::", "") else server_args.host
    url = f"http://{host}:{server_args.port}"
    print(f"peregrine: serving on Ray Serve\n  playground:  {url}/\n"
          f"  OpenAI API:  {url}/v1   (metrics of every replica: {url}/metrics)", flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("peregrine: shutting down the replicas ...", file=sys.stderr, flush=True)
        _stop()
    print("peregrine: stopped", file=sys.stderr, flush=True)
    return 0


def _stop() -> None:
    """Remove the application (Serve itself stays up on a shared cluster) and disconnect; a
    cluster this process started goes with it."""
    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
