"""Request and response models of the batch-connection contract (shared/CONTRACT.md).

`Endpoint` is one job (the contract's TestEndPoint); `BatchConnectionRequest`
and `BatchConnectionResponse` are the envelopes. `parse_jobs()` validates a raw
request in partial mode (one problem per invalid job, the others still run) or
strict mode (the first problem rejects the whole batch), naming the failing
field as ``jobs[2].db_type``; messages never echo a submitted value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from probe.addresses import HostPort, parse_host, parse_host_list
from probe.checkers import CHECKERS
from probe.errors import ErrorCode, RequestInvalid

DB_TYPES: tuple[str, ...] = tuple(CHECKERS)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Longer than any engine's user or database names, short enough that PostgreSQL's
# startup packet (10,000 bytes) still holds both: a longer one is a bad value, not
# a server that "closed the connection".
NAME_LIMIT = 1024
_SHA256 = re.compile(r"^[0-9A-Fa-f]{64}$")

# Error types of our own validators; "missing" ones map to DRS.M00201.
_MISSING_TYPES = {"missing", "string_too_short", "too_short", "probe_missing"}


def _missing(reason: str) -> PydanticCustomError:
    return PydanticCustomError("probe_missing", reason)


def _invalid(reason: str) -> PydanticCustomError:
    return PydanticCustomError("probe_invalid", reason)


class Endpoint(BaseModel):
    """One database endpoint to test (the contract's TestEndPoint)."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    id: StrictStr
    net_type: Literal["vpn", "vpc", "eip"]
    db_type: Annotated[StrictStr, Field(json_schema_extra={"enum": list(DB_TYPES)})]
    ip: Annotated[StrictStr, Field(min_length=1)]
    db_port: Annotated[StrictInt | None, Field(validate_default=True)] = None
    db_user: Annotated[StrictStr, Field(min_length=1)]
    db_password: SecretStr
    ssl_link: StrictBool = False
    ssl_cert_key: Annotated[SecretStr | None, Field(validate_default=True)] = None
    ssl_cert_name: Annotated[StrictStr | None, Field(validate_default=True)] = None
    ssl_cert_check_sum: Annotated[StrictStr | None, Field(validate_default=True)] = None
    ssl_cert_password: SecretStr | None = None
    end_point_type: Literal["so", "ta"] = "so"
    db_name: StrictStr | None = None
    inst_id: StrictStr | None = None
    vpc_id: StrictStr | None = None
    subnet_id: StrictStr | None = None
    region: StrictStr | None = None
    project_id: StrictStr | None = None

    @field_validator("end_point_type", "ssl_link", mode="before")
    @classmethod
    def _null_is_absent(cls, v: Any, info: ValidationInfo) -> Any:
        # Clients that write absent optional fields as null mean the default.
        if v is None:
            return "so" if info.field_name == "end_point_type" else False
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v:
            raise _missing("empty")
        if not _ID.fullmatch(v):
            raise _invalid("1-64 characters of A-Z a-z 0-9 _ -")
        return v

    @field_validator("db_type")
    @classmethod
    def _db_type(cls, v: str) -> str:
        if v not in CHECKERS:
            raise _invalid("one of " + ", ".join(DB_TYPES))
        return v

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str, info: ValidationInfo) -> str:
        db_type = info.data.get("db_type")
        v = v.strip()
        if not v:
            raise _missing("empty")
        if len(v) > 4096:
            raise _invalid("too long")
        try:
            if db_type is not None and CHECKERS[db_type].host_list:
                parse_host_list(v)
            else:
                parse_host(v, 1)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return v

    @field_validator("db_user", "db_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            if len(v) > NAME_LIMIT:
                raise _invalid(f"longer than {NAME_LIMIT} characters")
            if "\0" in v:
                # A NUL ends a field of the wire protocols: the rest would be read
                # as further connection parameters.
                raise _invalid("contains a NUL character")
            _unicode(v)
        return v

    @field_validator("db_password", "ssl_cert_password")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _unicode(v.get_secret_value())
        return v

    @field_validator("db_port")
    @classmethod
    def _db_port(cls, v: int | None, info: ValidationInfo) -> int | None:
        db_type = info.data.get("db_type")
        if db_type is None:
            return v
        checker = CHECKERS[db_type]
        if checker.host_list:
            if v not in (None, 0):
                raise _invalid("must be 0 for MongoDB: ports go in ip")
            return 0
        if v is None:
            return checker.default_port
        if not 1 <= v <= 65535:
            raise _invalid("must be from 1 to 65535")
        return v

    @field_validator("ssl_cert_key", "ssl_cert_name", "ssl_cert_check_sum")
    @classmethod
    def _ssl_fields(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("ssl_link"):
            raw = v.get_secret_value() if isinstance(v, SecretStr) else v
            if not raw:
                raise _missing("required when ssl_link is true")
            if info.field_name == "ssl_cert_check_sum" and not _SHA256.fullmatch(raw):
                raise _invalid("must be 64 hexadecimal characters (SHA-256)")
        return v

    def hosts(self) -> tuple[HostPort, ...]:
        """The host(s) to probe, with ports resolved from `ip` and `db_port`."""
        return self.parsed_hosts

    @cached_property
    def parsed_hosts(self) -> tuple[HostPort, ...]:
        """`hosts()`, parsed once: the runner asks for them several times per job."""
        if CHECKERS[self.db_type].host_list:
            return parse_host_list(self.ip)
        assert self.db_port is not None
        return (parse_host(self.ip, self.db_port),)

    def database(self) -> str | None:
        """The database to name at login (the contract's defaults applied)."""
        return self.db_name or CHECKERS[self.db_type].default_database


def _unicode(text: str) -> None:
    """Drivers send text as UTF-8: a lone surrogate (JSON allows ``"\\ud800"``) cannot be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("not valid Unicode text") from None


class BatchConnectionRequest(BaseModel):
    """The request body: ``{"jobs": [TestEndPoint, ...]}``."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    jobs: Annotated[list[Endpoint], Field(min_length=1)]


class TLSFacts(BaseModel):
    version: str | None = None
    cipher: str | None = None
    peer_cert_not_after: str | None = None
    peer_cert_subject: str | None = None


class CheckJobResp(BaseModel):
    """The result of one job. Detail fields are present only when asked for."""

    id: str
    status: Literal["success", "failed"]
    success: bool
    error_code: str | None = None
    error_msg: str | None = None
    # opt-in detail
    end_point_type: Literal["so", "ta"] | None = None
    elapsed_ms: float | None = None
    phases: dict[str, float] | None = None
    server_version: str | None = None
    address: str | None = None
    tls: TLSFacts | None = None
    replica_set: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class BatchConnectionResponse(BaseModel):
    """The response body: ``{"results": [...], "count": N}`` in request order."""

    results: list[CheckJobResp]
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"results": [r.to_json() for r in self.results], "count": self.count}


# ---------------------------------------------------------------- validation


def _path(index: int, loc: Sequence[str | int]) -> str:
    path = f"jobs[{index}]"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def problem_from(exc: ValidationError, index: int) -> RequestInvalid:
    """The one problem to report for an invalid job: missing fields first, then the rest."""
    errors = exc.errors(include_input=False, include_url=False)
    errors.sort(key=lambda e: e["type"] not in _MISSING_TYPES)  # stable: field order
    first = errors[0]
    missing = first["type"] in _MISSING_TYPES
    code = ErrorCode.PARAMETER_EMPTY if missing else ErrorCode.PARAMETER_INVALID
    cause = ""
    if first["type"] == "literal_error":  # "Input should be 'vpn', 'vpc' or 'eip'"
        cause = "one of " + first["msg"].removeprefix("Input should be ").replace(" or ", ", ")
    elif first["type"].startswith("probe_"):
        cause = first["msg"].removeprefix("Input should be ")
    elif first["type"] != "missing":
        cause = first["msg"].split(",")[0].lower()
    return RequestInvalid(code, field=_path(index, first["loc"]), cause=cause)


def parse_job(raw: Any, index: int) -> Endpoint | RequestInvalid:
    """One job validated, or the problem that makes it invalid."""
    if not isinstance(raw, dict):
        return RequestInvalid(ErrorCode.PARAMETER_INVALID, field=f"jobs[{index}]",
                              cause="must be an object")
    try:
        return Endpoint.model_validate(raw)
    except ValidationError as exc:
        problem = problem_from(exc, index)
        problem.job_id = job_id(raw)
        return problem


def decode_body(data: bytes) -> Any:
    """A request body's JSON value, or RequestInvalid(DRS.M00200) saying why there is none.

    UTF-8 (a byte-order mark is fine), strict JSON (no NaN or Infinity), not
    nested past the parser's depth, numbers Python will read: the CLI and the
    HTTP service take bodies through this one door.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestInvalid(ErrorCode.MALFORMED_BODY, cause="it is not UTF-8") from None
    if not text.strip():
        raise RequestInvalid(ErrorCode.MALFORMED_BODY, cause="it is empty")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RequestInvalid(ErrorCode.MALFORMED_BODY,
                             cause=f"not JSON at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise RequestInvalid(ErrorCode.MALFORMED_BODY, cause="nested too deeply") from None
    except ValueError:  # NaN or Infinity; an integer of more digits than Python converts
        raise RequestInvalid(ErrorCode.MALFORMED_BODY,
                             cause="a number JSON does not allow, or too long to read") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_jobs(body: Any, *, strict: bool = False) -> list[Endpoint | RequestInvalid]:
    """The jobs of a request body, each validated.

    Raises RequestInvalid when the envelope itself is wrong (not an object,
    `jobs` missing or empty) and, with `strict`, at the first invalid job.
    """
    if isinstance(body, BatchConnectionRequest):
        return list(body.jobs)
    if not isinstance(body, dict):
        raise RequestInvalid(ErrorCode.MALFORMED_BODY, cause="expected a JSON object")
    jobs = body.get("jobs")
    if jobs is None or jobs == []:
        raise RequestInvalid(ErrorCode.PARAMETER_EMPTY, field="jobs")
    if not isinstance(jobs, list):
        raise RequestInvalid(ErrorCode.PARAMETER_INVALID, field="jobs", cause="must be an array")
    parsed = [parse_job(raw, i) for i, raw in enumerate(jobs)]
    if strict:
        invalid = [item for item in parsed if isinstance(item, RequestInvalid)]
        if invalid:
            invalid[0].others = len(invalid) - 1
            raise invalid[0]
    return parsed


def job_id(raw: Any) -> str:
    """The id to answer an invalid job with: its own when it is a string, else empty."""
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and _ID.fullmatch(value) else ""
