"""The HTTP API's application: OpenAI's audio routes, the jobs API, and (at metrics.listen's address) the
metrics paths, behind one error shape. Every route but the metrics asks for the caller's identity first
(http_common.identify); docs/http.md describes them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from aiohttp import web
from prometheus_client import CollectorRegistry

from whisperd.config import Config
from whisperd.followers import JobFollowers
from whisperd.handlers import Caller, Handlers
from whisperd.http_common import errors_middleware, identify
from whisperd.http_intake import Intake
from whisperd.http_jobs import JobRoutes
from whisperd.http_openai import OpenAiRoutes
from whisperd.metrics_http import add_metrics_routes
from whisperd.segmentfeed import SegmentFeed
from whisperd.spool import Spool
from whisperd.tokens import TokenBook


def api_app(
    handlers: Handlers,
    spool: Spool,
    executor: Executor,
    followers: JobFollowers,
    segments: SegmentFeed,
    tokens: TokenBook | None,
    config: Callable[[], Config],
    daemon_uid: int,
    metrics: dict[str, CollectorRegistry] | None = None,
) -> web.Application:
    """executor: the threads that write uploads into the spool; metrics: the metrics paths to serve too."""

    def caller_of(request: web.Request) -> Caller:
        return identify(request, tokens, config())

    app = web.Application(middlewares=[errors_middleware])
    intake = Intake(handlers, spool, executor, config)
    OpenAiRoutes(handlers, intake, followers, segments, config).add_to(app, caller_of)
    JobRoutes(handlers, intake, followers, segments, config, daemon_uid).add_to(app, caller_of)
    if metrics:
        add_metrics_routes(app, metrics)
    return app
