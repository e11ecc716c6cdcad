"""Text logs hold one record per line: what a job names cannot forge a line of its own."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from schemas import Envelope, InvalidJob, JobStatus, LoadJob
from tasks.client import Client
from tasks.logs import PLAIN_FORMAT, PlainFormatter, escape_controls
from tasks.state.store import now
from tests.support.tenancy import send_raw
from tests.support.workers import WorkerPool

FORGED = "\nFORGED 2030-01-01 00:00:00,000 ERROR worker: all jobs lost\r\x1b[2K\u2028x"


def test_escape_controls_writes_every_control_character_as_an_escape() -> None:
    assert escape_controls("a\nb\rc\td\x00e\x1bf\x7fg\x85h\u2028i") == (
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i")
    assert escape_controls("plain, ünïcode ✓") == "plain, ünïcode ✓"


def test_a_record_is_one_line_and_a_traceback_cannot_pass_for_a_record() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(PlainFormatter(PLAIN_FORMAT.replace("%(job)s", "")))
    log = logging.getLogger("modelq.test.lines")
    log.addHandler(handler)
    try:
        log.warning("loading %s", FORGED)
        try:
            raise ValueError(f"bad path{FORGED}")
        except ValueError:
            log.exception("failed on %s", FORGED)
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], lines
    records = [line for line in lines if not line.startswith(" ")]
    assert len(records) == 2 and all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in records)


@pytest.mark.e2e
def test_a_newline_in_a_path_forges_no_line_in_the_worker_log(
        client: Client, pool: WorkerPool, tmp_path: Path) -> None:
    """The schema refuses control characters at submit; a producer that skips the client's
    checks gets its message refused by the worker, and the log line quoting it stays one line."""
    worker = pool.start("plainlog")
    with pytest.raises(InvalidJob, match="control characters"):
        client.submit({"kind": "load", "model": {"path": f"/m{FORGED}"}})
    payload = Envelope(job_id="f" * 32, submitted_at=now(),
                       job=LoadJob(model="/m")).model_dump(mode="json")
    payload["job"]["model"]["path"] = f"/m{FORGED}"
    send_raw(client, LoadJob(model="/m"), "modelq.worker.plainlog", job_id="f" * 32,
             create=True, payload=payload)
    record = client.job("f" * 32).wait(timeout=60)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "InvalidJob"
    worker.terminate()
    text = worker.log_text()
    assert "FORGED" in text  # the message was logged ...
    assert not [line for line in text.splitlines() if line.startswith("FORGED")]  # ... escaped
