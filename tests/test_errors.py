"""The error catalog: every code, both languages, no secrets."""

from __future__ import annotations

from probe.errors import CATALOG, LANGUAGES, ErrorCode, ProbeFailure, language, render, scrub


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


def test_language_falls_back_to_english() -> None:
    assert language("zh-CN") == "zh-cn"
    assert language("fr-fr") == "en-us" and language(None) == "en-us"
