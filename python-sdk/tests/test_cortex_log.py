"""serval.log: Cortex's structured logger (no cluster needed)."""

import io
import json

import pytest

from serval import log as slog


@pytest.fixture
def lines(monkeypatch):
    out = io.StringIO()
    handler = slog.logger.handlers[0]
    old = handler.setStream(out)
    monkeypatch.setenv("SERVAL_API_NAME", "iris")
    monkeypatch.setenv("SERVAL_API_KIND", "RealtimeAPI")
    yield lambda: [json.loads(x) for x in out.getvalue().splitlines()]
    handler.setStream(old)


def test_a_line_carries_the_cortex_fields_and_flattened_extra(lines):
    slog.logger.info("received payload", extra={"payload": "this movie is awesome", "n": {"a": 1}})
    (line,) = lines()
    assert line["message"] == "received payload" and line["levelname"] == "INFO"
    assert isinstance(line["process"], int) and line["asctime"]
    assert line["labels"] == {"apiName": "iris", "apiKind": "RealtimeAPI"}
    assert line["payload"] == "this movie is awesome" and line["n"] == {"a": 1}


def test_reserved_keys_cannot_be_overridden(lines):
    slog.logger.warning("hi", extra={"levelname": "FAKE", "message": "x", "process": -1, "labels": {}, "ok": 1})
    (line,) = lines()
    assert (line["levelname"], line["message"], line["ok"]) == ("WARNING", "hi", 1)
    assert line["process"] != -1 and line["labels"]["apiName"] == "iris"
    assert line["dropped_extra_keys"] == ["labels", "levelname", "message", "process"]


def test_lines_over_5_mb_are_dropped_with_a_warning(lines):
    slog.logger.info("big", extra={"blob": "x" * (slog.MAX_LINE_BYTES + 1)})
    slog.logger.info("small")
    first, second = lines()
    assert first["levelname"] == "WARNING" and "dropped" in first["message"]
    assert second["message"] == "small"


def test_exceptions_are_included(lines):
    try:
        raise ValueError("boom")
    except ValueError:
        slog.logger.exception("failed")
    (line,) = lines()
    assert line["levelname"] == "ERROR" and "ValueError: boom" in line["exception"]
