"""The workers' log lines: readable text by default, one JSON object per line with --log-format json."""

import json
import logging

import pytest

from credex.output import log_to_stderr


class Captured:
    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def captured(capsys):
    """What the workers' logs wrote on stderr (the handler is made in the test, on capsys's stderr)."""
    yield Captured(capsys)
    logging.getLogger("credex").handlers.clear()


def test_json_lines_carry_time_level_event_and_the_ids_involved(captured):
    log_to_stderr(format="json")
    log = logging.getLogger("credex.relay")
    log.info("published %d of %d due message(s)", 3, 4, extra={"relay_id": "vm:1:ab"})
    log.warning("redemption %s: no waybill yet", 7, extra={"redemption_id": 7, "message_id": "m-7"})
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "published 3 of 4 due message(s)" and first["level"] == "info"
    assert first["relay_id"] == "vm:1:ab" and first["logger"] == "credex.relay"
    assert first["ts"].endswith("Z") and first["ts"][:4].isdigit()
    assert second["level"] == "warning" and second["redemption_id"] == 7 and second["message_id"] == "m-7"


def test_a_json_line_never_shows_a_password_and_survives_odd_values(captured):
    log_to_stderr(format="json")
    log = logging.getLogger("credex.relay")
    log.warning("cannot reach amqp://guest:s3cret@localhost/%2F", extra={"when": object()})
    try:
        raise ConnectionError("postgresql://credex:pw-123@db/points refused")
    except ConnectionError:
        log.exception("lost the database")
    text = captured.getvalue()
    assert "s3cret" not in text and "pw-123" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[1]["error"].startswith("ConnectionError:")


def test_text_lines_are_one_readable_line_per_event(captured):
    log_to_stderr()
    logging.getLogger("credex.warehouse").info("warehouse connected")
    (line,) = captured.getvalue().splitlines()
    assert line.endswith("credex.warehouse INFO warehouse connected")
