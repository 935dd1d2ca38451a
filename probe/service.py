"""The HTTP API: ``POST /v3/{project_id}/jobs/batch-connection`` as shared/CONTRACT.md says.

`create_app(config)` builds the Starlette application; `command_serve(args)` runs
it on uvicorn for ``probe serve`` (several workers through uvicorn's factory mode,
each worker rebuilding the same configuration from ``PROBE_SERVE_OPTIONS``).

A request is checked in this order, and the first failed check answers::

    X-Auth-Token     401 DRS.M00100  missing or not accepted
    project_id       403 DRS.M00261  not 1-64 characters of [A-Za-z0-9-]
    project access   403 DRS.M00102  the token may not use this project
    Content-Type     400 DRS.M00202  not application/json
    ?detail          400 DRS.M00202  not true/false
    body size        400 DRS.M00202  over the limit (Content-Length, then counted while reading)
    JSON             400 DRS.M00200  not UTF-8 JSON, or not an object
    jobs             400 DRS.M00201  missing or empty
                     400 DRS.M00202  too many, or any invalid field (named: jobs[2].db_type)

Validation is all-or-nothing here (the DRS contract); only a fully valid batch
is probed. Error bodies are exactly ``{"error_code", "error_msg"}``, in the
language of ``X-Language``, built from catalog templates and field paths only,
so they never quote a submitted value. Anything unforeseen answers 500 with
``DRS.C10099`` and is logged by type and place, never sent as a traceback.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from probe.addresses import NetworkPolicy, parse_ports
from probe.checkers import CHECKERS, Checker, Facts, Target, Trace
from probe.errors import ErrorCode, Language, RequestInvalid, language
from probe.models import (
    DB_TYPES,
    BatchConnectionRequest,
    BatchConnectionResponse,
    CheckJobResp,
    Endpoint,
    decode_body,
    parse_jobs,
)
from probe.runner import Outcome, Prober, ProbeSettings
from probe.tasks import JsonFileTaskStates, TaskStateProvider, load_provider

log = logging.getLogger("probe.service")

DEFAULT_MAX_JOBS = 1000
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
BATCH_PATH = "/v3/{project_id}/jobs/batch-connection"
OPTIONS_ENV = "PROBE_SERVE_OPTIONS"  # how `probe serve` hands its options to worker processes

_PROJECT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
# Bodies above this are decoded and validated on a worker thread, off the event loop.
_THREAD_DECODE_BYTES = 256 * 1024
# The contract has no code for these; the API gateway in front of DRS answers an
# unknown API (path or method) with APIGW.0101, so a client sees the same here.
UNKNOWN_API_CODE = "APIGW.0101"

# Texts of the service itself (the catalog's templates cover everything else).
_TEXTS: dict[str, tuple[str, str]] = {
    "internal": (
        "An internal error occurred; the request was not processed.",
        "发生内部错误，请求未被处理。",
    ),
    "not_found": ("The API does not exist.", "该 API 不存在。"),
    "method": ("The API does not support this method.", "该 API 不支持此请求方法。"),
    "content_type": ("must be application/json", "必须为 application/json"),
    "detail": ("must be true or false", "必须为 true 或 false"),
    "body_too_large": ("larger than {limit} bytes", "超过 {limit} 字节"),
    "too_many_jobs": ("more than {limit} jobs", "任务数超过 {limit} 个"),
}


def _text(key: str, lang: Language, **params: object) -> str:
    en, zh = _TEXTS[key]
    return (zh if lang == "zh-cn" else en).format(**params)


# ---------------------------------------------------------------- tokens


class TokenTable:
    """Accepted ``X-Auth-Token`` values, each with the project ids it may use (``*``: any).

    Only SHA-256 digests are kept, and a lookup compares the digest of the
    presented token with every entry using `hmac.compare_digest`, without
    stopping at a match: the time taken says nothing about which token, or
    how much of one, was right.
    """

    ANY = "*"

    def __init__(self, tokens: Mapping[str, Sequence[str] | str]) -> None:
        entries: list[tuple[bytes, frozenset[str]]] = []
        for token, projects in tokens.items():
            if not isinstance(token, str) or not token.strip():
                raise ValueError("a token must be a non-empty string")
            if projects == self.ANY:
                allowed = frozenset({self.ANY})
            elif isinstance(projects, list) and all(isinstance(p, str) for p in projects):
                for project in projects:
                    if project != self.ANY and not _PROJECT_ID.fullmatch(project):
                        raise ValueError(f"{project!r} is not a valid project id")
                allowed = frozenset(projects)
            else:
                # Never quote the token itself in an error message.
                raise ValueError(
                    f"token #{len(entries) + 1}: the value must be a list of project ids, or \"*\""
                )
            entries.append((_digest(token.encode("utf-8")), allowed))
        if not entries:
            raise ValueError("no tokens in it")
        self._entries = tuple(entries)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """The table of a tokens file; ValueError (or OSError) says what is wrong, in one line."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(data, dict):
            raise ValueError('expected a JSON object: {"token": ["project-id", ...] or "*"}')
        return cls(data)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable({len(self._entries)} tokens)"

    def check(self, token: bytes | None, project_id: str) -> ErrorCode | None:
        """None when `token` may use `project_id`, else the code to answer with.

        The project id's format is checked between the two token checks, so an
        unauthenticated client learns nothing about project ids.
        """
        if not token:
            return ErrorCode.INVALID_TOKEN
        presented = _digest(token)
        allowed: frozenset[str] | None = None
        for digest, projects in self._entries:
            if hmac.compare_digest(digest, presented):
                allowed = projects
        if allowed is None:
            return ErrorCode.INVALID_TOKEN
        if not _PROJECT_ID.fullmatch(project_id):
            return ErrorCode.INVALID_PROJECT_ID
        if self.ANY in allowed or project_id in allowed:
            return None
        return ErrorCode.PROJECT_FORBIDDEN


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServiceConfig:
    """Everything one application instance needs.

    `tokens` is None only when authentication is deliberately off
    (``--insecure-no-auth``); `checkers` replaces the engines (tests).
    """

    tokens: TokenTable | None
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    task_states: TaskStateProvider | None = None
    max_jobs: int = DEFAULT_MAX_JOBS
    max_body: int = DEFAULT_MAX_BODY
    checkers: Mapping[str, Checker] | None = None

    def __post_init__(self) -> None:
        if self.max_jobs < 1 or self.max_body < 1:
            raise ValueError("max_jobs and max_body must be at least 1")


# ---------------------------------------------------------------- metrics


class ServiceMetrics:
    """The Prometheus metrics of one application, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.probes = Counter(
            "probe_probes", "Probes run (identical jobs of one batch share a probe)",
            ["db_type", "status", "error_code"], registry=self.registry,
        )
        self.duration = Histogram(
            "probe_probe_duration_seconds", "Time one probe took, queueing excluded",
            ["db_type"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "probe_batch_size", "Jobs per accepted batch-connection request",
            registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
        )
        self.in_flight = Gauge(
            "probe_probes_in_flight", "Probes talking to a server right now",
            registry=self.registry,
        )
        self.responses = Counter(
            "probe_http_responses", "Responses of the HTTP API by status and error code",
            ["status", "error_code"], registry=self.registry,
        )

    def observe(self, db_type: str, outcome: Outcome) -> None:
        """The Prober's observer: called once per probe that ran to an outcome."""
        failure = outcome.failure
        self.probes.labels(
            db_type=db_type,
            status="success" if failure is None else "failed",
            error_code="" if failure is None else failure.code.value,
        ).inc()
        self.duration.labels(db_type=db_type).observe(outcome.elapsed_ms / 1000)

    def metered(self, checkers: Mapping[str, Checker]) -> dict[str, Checker]:
        return {name: _MeteredChecker(c, self.in_flight) for name, c in checkers.items()}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _MeteredChecker(Checker):
    """A checker counted in the in-flight gauge while it runs, however it ends
    (the Prober's observer is not called for a probe cancelled from outside)."""

    def __init__(self, inner: Checker, gauge: Gauge) -> None:
        self._inner = inner
        self._gauge = gauge

    async def check(self, target: Target, trace: Trace) -> Facts:
        self._gauge.inc()
        try:
            return await self._inner.check(target, trace)
        finally:
            self._gauge.dec()


# ---------------------------------------------------------------- the application


class ClientGone(Exception):
    """Raised when the client disconnected before its request body was read."""


class BatchService:
    """The request handlers of one application; one Prober serves all its requests."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.prober = Prober(
            config.settings,
            task_states=config.task_states,
            checkers=self.metrics.metered(config.checkers or CHECKERS),
            observer=self.metrics.observe,
        )
        self.openapi = openapi_document(config)

    # ------------------------------------------------------------ responses

    def error(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        self.metrics.responses.labels(status=str(status), error_code=code).inc()
        return JSONResponse({"error_code": code, "error_msg": message}, status, headers=headers)

    def problem(self, exc: RequestInvalid, lang: Language) -> JSONResponse:
        status = exc.http_status if exc.http_status >= 400 else 400
        return self.error(status, exc.code.value, exc.message(lang))

    def internal_error(self, exc: BaseException, lang: Language) -> JSONResponse:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # the task group's wrapper says nothing
        # Where, not what: an exception's text may quote a request's secrets.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        log.error("internal error serving a request: %s at %s", type(exc).__name__, where)
        return self.error(500, ErrorCode.INTERNAL.value, _text("internal", lang))

    # ------------------------------------------------------------ routes

    async def batch_connection(self, request: Request) -> Response:
        lang = language(request.headers.get("x-language"))
        try:
            return await self._batch_connection(request, lang)
        except RequestInvalid as exc:
            return self.problem(exc, lang)
        except ClientGone:
            return Response(status_code=400)  # nobody is listening any more
        except Exception as exc:
            return self.internal_error(exc, lang)

    async def _batch_connection(self, request: Request, lang: Language) -> Response:
        project_id: str = request.path_params["project_id"]
        if self.config.tokens is not None:
            raw_token = request.headers.get("x-auth-token")
            code = self.config.tokens.check(
                raw_token.encode("latin-1") if raw_token is not None else None, project_id
            )
            if code is not None:
                raise RequestInvalid(code)
        elif not _PROJECT_ID.fullmatch(project_id):
            raise RequestInvalid(ErrorCode.INVALID_PROJECT_ID)
        if not _is_json(request.headers.get("content-type", "")):
            raise RequestInvalid(ErrorCode.PARAMETER_INVALID, field="Content-Type",
                                 cause=_text("content_type", lang))
        detail = _flag(request.query_params.get("detail"), lang)

        body = await self._read_body(request, lang)
        if len(body) > _THREAD_DECODE_BYTES:
            jobs = await anyio.to_thread.run_sync(self._decode, body, lang)
        else:
            jobs = self._decode(body, lang)
        self.metrics.batch_size.observe(len(jobs))

        batch = BatchConnectionRequest.model_construct(jobs=jobs)
        response = await self._run_until_disconnect(request, batch, detail, lang)
        if response is None:
            return Response(status_code=400)  # the client left; its probes were cancelled
        self.metrics.responses.labels(status="200", error_code="").inc()
        return JSONResponse(response.to_json())

    async def _read_body(self, request: Request, lang: Language) -> bytes:
        """The body, read chunk by chunk and refused as soon as it passes the limit."""
        limit = self.config.max_body
        too_large = RequestInvalid(ErrorCode.PARAMETER_INVALID, field="body",
                                   cause=_text("body_too_large", lang, limit=limit))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _decode(self, body: bytes, lang: Language) -> list[Endpoint]:
        """Every job of a request body, validated all-or-nothing."""
        data = decode_body(body)
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if isinstance(jobs, list) and len(jobs) > self.config.max_jobs:
            raise RequestInvalid(ErrorCode.PARAMETER_INVALID, field="jobs",
                                 cause=_text("too_many_jobs", lang, limit=self.config.max_jobs))
        return [job for job in parse_jobs(data, strict=True) if isinstance(job, Endpoint)]

    async def _run_until_disconnect(
        self, request: Request, batch: BatchConnectionRequest, detail: bool, lang: Language
    ) -> BatchConnectionResponse | None:
        """The batch's response, or None when the client disconnected first
        (which cancels the probes still running)."""
        response: BatchConnectionResponse | None = None
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                # The body has been read: the next message can only be a disconnect.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            response = await self.prober.run(batch, detail=detail, strict=True, lang=lang)
            tg.cancel_scope.cancel()
        return response

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    # ------------------------------------------------------------ errors outside the routes

    async def http_exception(self, request: Request, exc: Exception) -> Response:
        lang = language(request.headers.get("x-language"))
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return self.error(405, UNKNOWN_API_CODE, _text("method", lang), exc.headers)
        return self.error(exc.status_code, UNKNOWN_API_CODE, _text("not_found", lang))

    async def unhandled(self, request: Request, exc: Exception) -> Response:
        return self.internal_error(exc, language(request.headers.get("x-language")))


class _AnyText(Convertor[str]):
    """Any path segment text at all, newlines and slashes included (Starlette's `path`
    stops at a newline), so every malformed project id reaches the handler's 403."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("probe_any_text", _AnyText())


def create_app(config: ServiceConfig) -> Starlette:
    """The ASGI application serving `config`; its state holds the `BatchService`."""
    service = BatchService(config)
    batch_path = BATCH_PATH.replace("{project_id}", "{project_id:probe_any_text}")
    app = Starlette(
        routes=[
            Route(batch_path, service.batch_connection, methods=["POST"]),
            Route("/healthz", service.healthz, methods=["GET"]),
            Route("/metrics", service.metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", service.openapi_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: service.http_exception, Exception: service.unhandled},
    )
    # A path with a trailing slash is another path: 404 with a body, not a bare 307.
    app.router.redirect_slashes = False
    app.state.service = service
    return app


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json"


def _flag(value: str | None, lang: Language) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise RequestInvalid(ErrorCode.PARAMETER_INVALID, field="detail", cause=_text("detail", lang))


# ---------------------------------------------------------------- OpenAPI

_ENDPOINT_DOCS: dict[str, str] = {
    "id": "DRS task id: 1-64 characters of A-Z a-z 0-9 _ -. Two jobs may share an id.",
    "net_type": "Network type.",
    "db_type": "Database type; mongodb also covers DDS, taurus is MySQL-compatible.",
    "ip": "MySQL/PostgreSQL: one host (IPv4, IPv6 with or without brackets, or a DNS name). "
          "MongoDB: host[:port] entries separated by commas; no port means 27017.",
    "db_port": "MySQL/taurus default 3306, PostgreSQL default 5432, 1-65535. "
               "MongoDB: 0 or absent (ports live in ip).",
    "db_user": "Database account.",
    "db_password": "Database password; may be empty. Never echoed.",
    "ssl_link": "Whether to connect with SSL.",
    "ssl_cert_key": "Base64 of the certificate file (PEM, DER or PKCS#12); at most 500 KiB "
                    "decoded. Required when ssl_link is true.",
    "ssl_cert_name": "Certificate file name. Required when ssl_link is true.",
    "ssl_cert_check_sum": "SHA-256 hex of the decoded certificate. Required when ssl_link is true.",
    "ssl_cert_password": "Password of a PKCS#12 certificate file.",
    "end_point_type": "so (source) or ta (target); missing means so.",
    "db_name": "MongoDB: authentication database (default admin). PostgreSQL: database "
               "(default postgres). MySQL: optional default schema.",
    "inst_id": "DB instance id (cloud instances).",
    "vpc_id": "VPC id (cloud instances).",
    "subnet_id": "Subnet id (cloud instances).",
    "region": "Region of the DB instance.",
    "project_id": "Project id of the region where the user is.",
}

_RESULT_DOCS: dict[str, str] = {
    "id": "The job's id.",
    "status": "Test result.",
    "success": "Whether status is success.",
    "error_code": "Only when failed: a catalog code.",
    "error_msg": "Only when failed: a message in the request language naming host:port and "
                 "the cause.",
}


def _plain(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic property schema as the contract states it: an optional field has its
    type (not ``anyOf [type, null]``); titles and null defaults dropped."""
    out = dict(schema)
    variants = out.pop("anyOf", None)
    if variants is not None:
        kept = [v for v in variants if v.get("type") != "null"]
        if len(kept) == 1:
            out = {**kept[0], **out}
        else:
            out["anyOf"] = kept
    out.pop("title", None)
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def _model_schema(model: Any, docs: Mapping[str, str], defs: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = model.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    for name, sub in schema.pop("$defs", {}).items():
        sub.pop("title", None)
        sub["properties"] = {k: _plain(v) for k, v in sub["properties"].items()}
        defs[name] = sub
    schema.pop("title", None)
    schema["properties"] = {
        name: {**_plain(prop), **({"description": docs[name]} if name in docs else {})}
        for name, prop in schema["properties"].items()
    }
    return schema


def openapi_document(config: ServiceConfig) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this service, built from the pydantic models plus
    the contract rules pydantic cannot express (patterns, ranges, conditional fields)."""
    defs: dict[str, Any] = {}
    endpoint = _model_schema(Endpoint, _ENDPOINT_DOCS, defs)
    endpoint["title"] = "TestEndPoint"
    props = endpoint["properties"]
    props["id"].update(minLength=1, maxLength=64, pattern="^[A-Za-z0-9_-]{1,64}$")
    props["db_port"].update(minimum=0, maximum=65535)
    for secret in ("db_password", "ssl_cert_key", "ssl_cert_password"):
        props[secret].pop("format", None)
        props[secret]["writeOnly"] = True
    host_list_types = [name for name, c in CHECKERS.items() if c.host_list]
    endpoint["additionalProperties"] = True  # unknown fields are ignored, never an error
    endpoint["allOf"] = [
        {
            "if": {"properties": {"ssl_link": {"const": True}}, "required": ["ssl_link"]},
            "then": {
                "required": ["ssl_cert_key", "ssl_cert_name", "ssl_cert_check_sum"],
                "properties": {
                    "ssl_cert_key": {"minLength": 1},
                    "ssl_cert_name": {"minLength": 1},
                    "ssl_cert_check_sum": {"pattern": "^[0-9A-Fa-f]{64}$"},
                },
            },
        },
        {
            "if": {"properties": {"db_type": {"enum": host_list_types}},
                   "required": ["db_type"]},
            "then": {"properties": {"db_port": {"const": 0}}},
            "else": {"properties": {"db_port": {"minimum": 1}}},
        },
    ]

    result = _model_schema(CheckJobResp, _RESULT_DOCS, defs)
    result["title"] = "CheckJobResp"
    result["properties"]["error_code"]["enum"] = [code.value for code in ErrorCode]
    for name in result["properties"]:
        if name not in _RESULT_DOCS:
            result["properties"][name]["description"] = "Only with ?detail=true."
    result["additionalProperties"] = False

    error_body = {
        "title": "ErrorResponse",
        "type": "object",
        "properties": {
            "error_code": {"type": "string", "description": "A catalog code."},
            "error_msg": {"type": "string", "description": "Message in the request language."},
        },
        "required": ["error_code", "error_msg"],
        "additionalProperties": False,
    }
    schemas: dict[str, Any] = {
        "TestEndPoint": endpoint,
        "BatchConnectionRequest": {
            "title": "BatchConnectionRequest",
            "type": "object",
            "properties": {
                "jobs": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/TestEndPoint"},
                    "minItems": 1,
                    "maxItems": config.max_jobs,
                },
            },
            "required": ["jobs"],
        },
        "CheckJobResp": result,
        "BatchConnectionResponse": {
            "title": "BatchConnectionResponse",
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/CheckJobResp"},
                    "description": "One result per job, in the order of the request.",
                },
                "count": {"type": "integer", "minimum": 1, "description": "len(results)"},
            },
            "required": ["results", "count"],
            "additionalProperties": False,
        },
        "ErrorResponse": error_body,
        **defs,
    }

    def error(description: str, *codes: ErrorCode | str) -> dict[str, Any]:
        values = [c.value if isinstance(c, ErrorCode) else c for c in codes]
        return {
            "description": f"{description} ({', '.join(values)})",
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }

    operation: dict[str, Any] = {
        "operationId": "batchConnection",
        "summary": "Test the connections to source and destination databases in batches",
        "parameters": [
            {"name": "project_id", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,64}$"}},
            {"name": "X-Language", "in": "header", "required": False,
             "schema": {"type": "string", "enum": ["en-us", "zh-cn"], "default": "en-us"}},
            {"name": "detail", "in": "query", "required": False,
             "schema": {"type": "boolean", "default": False},
             "description": "Add end_point_type, elapsed_ms, phases, server_version, "
                            "address and tls to each result."},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/BatchConnectionRequest"}}},
        },
        "responses": {
            "200": {"description": "One result per job, in request order",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/BatchConnectionResponse"}}}},
            "400": error("Invalid request", ErrorCode.MALFORMED_BODY,
                         ErrorCode.PARAMETER_EMPTY, ErrorCode.PARAMETER_INVALID),
            "401": error("Missing or invalid token", ErrorCode.INVALID_TOKEN),
            "403": error("Project not allowed", ErrorCode.INVALID_PROJECT_ID,
                         ErrorCode.PROJECT_FORBIDDEN),
            "500": error("Internal error", ErrorCode.INTERNAL),
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "probe: DRS batch connection testing",
            "version": _version(),
            "description": f"Database types: {', '.join(DB_TYPES)}. At most "
                           f"{config.max_jobs} jobs and {config.max_body} bytes per request.",
        },
        "paths": {
            BATCH_PATH: {"post": operation},
            "/healthz": {"get": {"operationId": "healthz", "responses": {
                "200": {"description": "The service is up"}}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": schemas},
    }
    if config.tokens is not None:
        document["components"]["securitySchemes"] = {
            "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}}
        operation["security"] = [{"token": []}]
    copied: dict[str, Any] = copy.deepcopy(document)
    return copied


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("probe")
    except PackageNotFoundError:
        return "0"


# ---------------------------------------------------------------- probe serve


class ConfigError(Exception):
    """Raised when the serve options cannot be used; `probe serve` exits 2 with its one line."""


@dataclass
class ServeOptions:
    """`probe serve`'s options, CLI over ``PROBE_*`` variables, as plain data that
    worker processes receive through ``PROBE_SERVE_OPTIONS``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    max_jobs: int = DEFAULT_MAX_JOBS
    max_body: int = DEFAULT_MAX_BODY
    tokens_file: str | None = None
    insecure_no_auth: bool = False
    tasks_file: str | None = None
    task_provider: str | None = None
    deny_cidr: list[str] = field(default_factory=list)
    allow_cidr: list[str] = field(default_factory=list)
    allow_ports: list[int] = field(default_factory=list)
    # ProbeSettings given on the command line (PROBE_TIMEOUT & co. are read by from_env).
    settings: dict[str, Any] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> ServeOptions:
        return cls(**json.loads(text))


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{key} must be a positive integer")
    return int(value)


def _env_list(env: Mapping[str, str], key: str) -> list[str]:
    return [item.strip() for item in env.get(key, "").split(",") if item.strip()]


def _ports(text: str, source: str) -> list[int]:
    try:
        return parse_ports(text, source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def options_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeOptions:
    """`probe serve`'s options: command-line flags win over ``PROBE_*`` variables."""
    env = os.environ if environ is None else environ

    def pick(flag: Any, fallback: Any, default: Any) -> Any:
        if flag not in (None, [], ""):
            return flag
        return default if fallback in (None, [], "") else fallback

    allow_ports = args.allow_ports if args.allow_ports else env.get("PROBE_ALLOW_PORTS", "")
    source = "--allow-ports" if args.allow_ports else "PROBE_ALLOW_PORTS"
    settings = {
        "deadline": args.timeout,
        "connect_timeout": args.connect_timeout,
        "concurrency": args.concurrency,
        "per_host": args.per_host,
        "batch_deadline": args.batch_timeout,
        "language": language(args.lang) if args.lang else None,
        "verify_hostname": args.verify_hostname,
    }
    port = pick(args.port, _env_int(env, "PROBE_PORT"), DEFAULT_PORT)
    if port > 65535:
        raise ConfigError("PROBE_PORT must be a port number from 1 to 65535")
    return ServeOptions(
        host=pick(args.host, env.get("PROBE_HOST", "").strip(), DEFAULT_HOST),
        port=port,
        workers=pick(args.workers, _env_int(env, "PROBE_WORKERS"), 1),
        max_jobs=pick(args.max_jobs, _env_int(env, "PROBE_MAX_JOBS"), DEFAULT_MAX_JOBS),
        max_body=pick(args.max_body, _env_int(env, "PROBE_MAX_BODY"), DEFAULT_MAX_BODY),
        tokens_file=pick(args.tokens_file, env.get("PROBE_TOKENS_FILE"), None),
        insecure_no_auth=bool(args.insecure_no_auth) or _truthy(env.get("PROBE_INSECURE_NO_AUTH")),
        tasks_file=pick(args.tasks_file, env.get("PROBE_TASKS_FILE"), None),
        task_provider=pick(args.task_provider, env.get("PROBE_TASK_PROVIDER"), None),
        deny_cidr=pick(args.deny_cidr, _env_list(env, "PROBE_DENY_CIDR"), []),
        allow_cidr=pick(args.allow_cidr, _env_list(env, "PROBE_ALLOW_CIDR"), []),
        allow_ports=_ports(allow_ports, source),
        settings={k: v for k, v in settings.items() if v is not None},
    )


def config_from(options: ServeOptions) -> ServiceConfig:
    """The application configuration for `options`, loading the tokens and tasks files;
    ConfigError says in one line what cannot be used."""
    if options.tokens_file and options.insecure_no_auth:
        raise ConfigError("give either a tokens file or --insecure-no-auth, not both")
    tokens: TokenTable | None = None
    if options.tokens_file:
        try:
            tokens = TokenTable.load(options.tokens_file)
        except OSError as exc:
            raise ConfigError(f"tokens file {options.tokens_file}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"tokens file {options.tokens_file}: {exc}") from None
    elif not options.insecure_no_auth:
        raise ConfigError(
            "refusing to start without authentication: give --tokens-file "
            "(or PROBE_TOKENS_FILE), or --insecure-no-auth for local use"
        )
    if options.tasks_file and options.task_provider:
        raise ConfigError("give either --tasks-file or --task-provider, not both")
    task_states: TaskStateProvider | None = None
    if options.tasks_file:
        try:
            task_states = JsonFileTaskStates(options.tasks_file)
        except OSError as exc:
            raise ConfigError(f"tasks file {options.tasks_file}: {exc.strerror}") from None
        except ValueError as exc:  # JSONDecodeError included
            raise ConfigError(f"tasks file {options.tasks_file}: {exc}") from None
    elif options.task_provider:
        try:
            task_states = load_provider(options.task_provider)
        except Exception as exc:  # an import or a factory of someone else's: report, don't dump
            raise ConfigError(f"task provider {options.task_provider}: "
                              f"{type(exc).__name__}: {exc}") from None
    try:
        policy = NetworkPolicy.from_text(",".join(options.deny_cidr),
                                         ",".join(options.allow_cidr),
                                         ",".join(map(str, options.allow_ports)))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        settings = ProbeSettings.from_env(**options.settings, policy=policy)
        return ServiceConfig(tokens=tokens, settings=settings, task_states=task_states,
                             max_jobs=options.max_jobs, max_body=options.max_body)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def worker_app() -> Starlette:
    """The application of one worker process (uvicorn's factory mode, ``--workers`` > 1)."""
    return create_app(config_from(ServeOptions.from_env(os.environ[OPTIONS_ENV])))


def command_serve(args: argparse.Namespace) -> int:
    """``probe serve``: run the HTTP API on uvicorn until interrupted."""
    import uvicorn

    try:
        options = options_from(args)
        config = config_from(options)  # fail here, once, before any worker starts
    except ConfigError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    if config.tokens is None:
        reach = "this machine" if _is_loopback(options.host) else "the network"
        print(f"probe: warning: no authentication (--insecure-no-auth): anyone on {reach} "
              f"who can reach {options.host}:{options.port} may use it", file=sys.stderr)
    problem = _cannot_listen(options.host, options.port)
    if problem is not None:
        print(f"probe: cannot listen on {options.host}:{options.port}: {problem}",
              file=sys.stderr)
        return 2
    common: dict[str, Any] = {
        "host": options.host,
        "port": options.port,
        "server_header": False,
        "log_level": "info",
        # On shutdown, running batches get their probe deadline to finish, then are cancelled.
        "timeout_graceful_shutdown": int(config.settings.deadline) + 5,
    }
    try:
        if options.workers > 1:
            os.environ[OPTIONS_ENV] = options.to_env()
            uvicorn.run("probe.service:worker_app", factory=True, workers=options.workers,
                        **common)
        else:
            uvicorn.run(create_app(config), **common)
    except SystemExit as exc:  # uvicorn exits 3 when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _cannot_listen(host: str, port: int) -> str | None:
    """Why uvicorn would fail to bind host:port (checked first, for a one-line answer)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            listener.bind(address)
    except socket.gaierror as exc:
        return f"the host does not resolve ({exc.strerror})"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = [
    "BatchService",
    "ConfigError",
    "ServeOptions",
    "ServiceConfig",
    "ServiceMetrics",
    "TokenTable",
    "command_serve",
    "config_from",
    "create_app",
    "openapi_document",
    "options_from",
    "worker_app",
]
