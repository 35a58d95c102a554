"""Nothing is lost: when listmilter cannot do its job, Postfix answers 4xx and the sender retries."""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.bed.net import wait_until
from tests.conftest import Bed, message


@pytest.fixture
def own_bed(request):
    b = Bed(getattr(request, "param", "sqlite"))
    yield b
    b.stop()


def _send_expect_4xx(bed, lst):
    try:
        refused = bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    except smtplib.SMTPRecipientsRefused as e:
        code = e.recipients[lst][0]
    except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused, smtplib.SMTPResponseException) as e:
        code = e.smtp_code
    else:
        pytest.fail(f"message accepted while listmilter could not expand it: {refused}")
    assert 400 <= code < 500, code


@pytest.mark.parametrize("own_bed", ["sqlite", "yaml"], indirect=True)
def test_milter_down_gives_4xx_then_delivered_exactly_once_after_restart(own_bed):
    bed = own_bed
    lst = bed.new_list(["d1@example.net", "d2@example.net"], posting="open")
    bed.listmilter.stop()
    _send_expect_4xx(bed, lst)
    assert "status=sent" not in bed.postfix.log()
    bed.listmilter.start()
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    wait_until(bed.postfix.queue_empty, 30, what="queue to drain")
    time.sleep(1.5)
    assert sorted(bed.sink.recipients()) == ["d1@example.net", "d2@example.net"]


def test_store_broken_at_run_time_gives_4xx(own_bed):
    bed = own_bed
    lst = bed.new_list(["s1@example.net"], posting="open")
    db = sqlite3.connect(bed.listmilter.state_dir / "listmilter.sqlite")
    db.execute("DROP TABLE members")
    db.commit()
    db.close()
    _send_expect_4xx(bed, lst)
    assert bed.sink.deliveries() == []
    assert "status=deferred" in bed.listmilter.log()


def test_store_unreadable_at_start_stops_serve_and_postfix_answers_4xx(own_bed):
    bed = own_bed
    lst = bed.new_list(["s1@example.net"], posting="open")
    bed.listmilter.stop()
    (bed.listmilter.state_dir / "listmilter.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (bed.listmilter.state_dir / f"listmilter.sqlite{suffix}").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "listmilter", "-c", str(bed.listmilter.config_path), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75
    assert "not a database" in proc.stderr and "Traceback" not in proc.stderr
    _send_expect_4xx(bed, lst)


@pytest.mark.parametrize("own_bed", ["yaml"], indirect=True)
def test_broken_yaml_edit_keeps_the_last_good_config_running(own_bed):
    bed = own_bed
    lst = bed.new_list(["y1@example.net"], posting="open")
    good = bed.listmilter.config_path.read_text()
    bed.listmilter.config_path.write_text(good + "lists:\n  - this: [is broken\n")
    time.sleep(2.5)     # past the reload check interval
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    bed.sink.wait_for_recipients(1)
    assert bed.sink.recipients() == ["y1@example.net"]
    log = bed.listmilter.log()
    assert "config reload failed, still running on the last good config" in log
    assert f"{bed.listmilter.config_path}:" in log
    # Fixing the file is picked up without a restart.
    later = bed.new_list(["y2@example.net"], posting="open")
    bed.smtp("carol@example.net", [later], message(to=later, sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    assert "y2@example.net" in bed.sink.recipients()


def test_broken_config_at_start_is_reported_with_file_and_line_and_postfix_tempfails(own_bed):
    bed = own_bed
    lst = bed.new_list(["c1@example.net"], posting="open")
    bed.listmilter.stop()
    text = bed.listmilter.config_path.read_text()
    bed.listmilter.config_path.write_text(text + "defaults:\n  posting: everyone\n")
    line = len(text.splitlines()) + 2
    proc = subprocess.run([sys.executable, "-m", "listmilter", "-c", str(bed.listmilter.config_path), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert proc.stderr.strip() == (f"{bed.listmilter.config_path}:{line}: defaults.posting: "
                                   "must be one of open, members, announce (got 'everyone')")
    _send_expect_4xx(bed, lst)
