"""The error catalog: every code, both languages, no secrets."""

from __future__ import annotations

import ast
from pathlib import Path

from probe.checkers.base import TLS_SPEAKER, describe_stranger
from probe.checkers.mongodb import _HUNG_UP, _HUNG_UP_NOT_TLS
from probe.checkers.mysql import _MAYBE_TLS_REQUIRED
from probe.errors import (
    CATALOG,
    LANGUAGES,
    ErrorCode,
    ProbeFailure,
    cause_zh,
    language,
    render,
    scrub,
)


def test_every_code_has_both_texts() -> None:
    assert set(CATALOG) == set(ErrorCode)
    for code in ErrorCode:
        for lang in LANGUAGES:
            text = render(code, lang, target="10.0.0.1:3306", field="jobs[0].ip", cause="x")
            assert text and "{" not in text, (code, lang)
        assert CATALOG[code].en != CATALOG[code].zh


def test_request_codes_have_their_http_status() -> None:
    assert CATALOG[ErrorCode.INVALID_TOKEN].http_status == 401
    assert CATALOG[ErrorCode.PROJECT_FORBIDDEN].http_status == 403
    assert CATALOG[ErrorCode.INVALID_PROJECT_ID].http_status == 403
    for code in (ErrorCode.MALFORMED_BODY, ErrorCode.PARAMETER_EMPTY, ErrorCode.PARAMETER_INVALID):
        assert CATALOG[code].http_status == 400


def test_messages_never_contain_the_password() -> None:
    password = "S3cret-Canary@:/%?"
    driver_text = f"FATAL: password {password} rejected for postgresql://u:{password}@h/db"
    for code in ErrorCode:
        failure = ProbeFailure(code, target="h:1", cause=scrub(driver_text, password))
        for lang in LANGUAGES:
            assert password not in failure.message(lang)
        assert password not in repr(failure) and password not in str(failure)


def test_scrub_masks_a_secret_in_any_case() -> None:
    # a host name comes back lowercased from the resolver
    assert scrub("cannot resolve canary-secret-9931:1", "Canary-Secret-9931") == (
        "cannot resolve ***:1")
    assert scrub("ab and AB", "ab") == "ab and AB"  # shorter than 3: nothing to mask
    # one secret inside another: the longer is masked whole
    assert scrub("p=Secret-Cert-99", "Secret", "Secret-Cert-99") == "p=***"


def test_language_falls_back_to_english() -> None:
    assert language("zh-CN") == "zh-cn"
    assert language("fr-fr") == "en-us" and language(None) == "en-us"


def _causes_written_in(path: Path) -> set[str]:
    """The literal causes a module writes: cause="...", _invalid("..."), _missing("..."),
    ValueError("...") (the ip grammar), and the strings _gai_cause returns."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            values = [k.value for k in node.keywords if k.arg == "cause"]
            if name in ("_invalid", "_missing") or (name == "ValueError"
                                                   and path.name == "addresses.py"):
                values += node.args[:1]
            found.update(v.value for v in values
                         if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value)
        if isinstance(node, ast.FunctionDef) and node.name == "_gai_cause":
            found.update(n.value.value for n in ast.walk(node) if isinstance(n, ast.Return)
                         and isinstance(n.value, ast.Constant))
    return found


def test_every_cause_probe_writes_has_a_chinese_text() -> None:
    root = Path(__file__).resolve().parent.parent / "probe"
    causes: set[str] = {TLS_SPEAKER, _MAYBE_TLS_REQUIRED, _HUNG_UP, _HUNG_UP_NOT_TLS}
    for path in root.rglob("*.py"):
        if "testing" not in path.parts:
            causes |= _causes_written_in(path)
    assert len(causes) > 30  # the scan found them
    assert {c for c in causes if cause_zh(c) == c} == set()


def test_formatted_causes_have_chinese_texts_and_driver_text_stays() -> None:
    strangers = [describe_stranger(b) for b in (b"SSH-2.0-x", b"HTTP/1.1 400", b"R\0\0\0\x08")]
    formatted = [*strangers, "one of mysql, postgresql", "longer than 1024 characters",
                 "no answer within 2 s", "waited 3.0 s", "the server's answer is not MySQL",
                 "tried 127.0.0.1:1: DRS.C10012", "it is RUNNING", "one of 'vpn', 'vpc', 'eip'",
                 "the server sent nothing for 2.0 s, then something that is not a MySQL greeting"]
    for cause in formatted:
        assert cause is not None and cause_zh(cause) != cause, cause
    assert cause_zh("Access denied for user 'u'@'h'") == "Access denied for user 'u'@'h'"
    message = render(ErrorCode.CONNECT_TIMEOUT, "zh-cn", target="10.0.0.1:5432",
                     cause="no answer within 5 s")
    assert message.startswith("10.0.0.1:5432 没有 TCP 响应：5 秒内无应答。")
