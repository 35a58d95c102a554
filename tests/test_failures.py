"""Nothing is lost: when listmilter cannot do its job, Postfix answers 4xx (the exact
reply docs/design.md promises) and the sender's retry of the same message is
delivered exactly once."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from tests.bed.net import wait_until
from tests.conftest import message

# listmilter down: Postfix's socketmap lookup of the list address fails at RCPT (docs/postfix.md:
# only list mail waits; milter_default_action = accept lets other mail through).
LIST_DOWN = (451, "4.3.0 <{rcpt}>: Temporary lookup failure")


def _message_id(data: bytes) -> str:
    return next(line.split(b":", 1)[1].strip().decode() for line in data.splitlines()
                if line.lower().startswith(b"message-id:"))


def assert_each_once(bed, expected: list[str], data: bytes) -> None:
    """Every recipient got exactly one copy, of this message; nobody else got anything."""
    got = bed.sink.by_recipient()
    assert sorted(got) == sorted(expected), got
    for rcpt, copies in got.items():
        assert [m.message["Message-ID"] for m in copies] == [_message_id(data)], (rcpt, len(copies))


@pytest.mark.parametrize("own_bed", ["sqlite", "yaml"], indirect=True)
def test_milter_down_gives_451_4_7_1_and_the_retry_is_delivered_exactly_once(own_bed):
    bed = own_bed
    lst = bed.new_list(["d1@example.net", "d2@example.net"], posting="open")
    data = message(to=lst, sender="carol@example.net")
    bed.listmilter.stop()
    reply = bed.submit("carol@example.net", [lst], data)
    assert (reply.stage, reply.code, reply.text) == (f"RCPT {lst}", LIST_DOWN[0], LIST_DOWN[1].format(rcpt=lst)), reply
    bed.settle()
    assert bed.sink.deliveries() == [] and "status=sent" not in bed.postfix.log()
    bed.listmilter.start()
    assert bed.submit("carol@example.net", [lst], data).code == 250      # the client's retry: the same message
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert_each_once(bed, ["d1@example.net", "d2@example.net"], data)


def test_store_broken_at_run_time_gives_451_4_3_0(own_bed):
    bed = own_bed
    lst = bed.new_list(["s1@example.net"], posting="open")
    db = sqlite3.connect(bed.listmilter.state_dir / "listmilter.sqlite")
    db.execute("DROP TABLE members")
    db.commit()
    db.close()
    reply = bed.submit("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert (reply.stage, reply.code, reply.text) == \
        (f"RCPT {lst}", 451, "4.3.0 listmilter: list store unavailable; try again later"), reply
    bed.settle()
    assert bed.sink.deliveries() == []
    assert f"NOQUEUE: to=<{lst}>, status=deferred (" in bed.listmilter.log()


def test_store_unreadable_at_start_stops_serve_and_postfix_answers_451(own_bed):
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
    reply = bed.submit("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert (reply.code, reply.text) == (LIST_DOWN[0], LIST_DOWN[1].format(rcpt=lst)), reply


@pytest.mark.parametrize("own_bed", ["yaml"], indirect=True)
def test_broken_yaml_edit_keeps_the_last_good_config_running(own_bed):
    bed = own_bed
    lm = bed.listmilter
    lst = bed.new_list(["y1@example.net"], posting="open")
    good = lm.config_path.read_text()
    lm.config_path.write_text(good + "lists:\n  - this: [is broken\n")
    # serve looks at the file's mtime once a second, when asked something: ask until it has looked.
    wait_until(lambda: lm.knows(lst) and "config reload failed" in lm.log(), 15, interval=0.2,
               what="serve to read the broken file")
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    bed.sink.wait_for_recipients(1)
    assert bed.sink.recipients() == ["y1@example.net"]
    log = lm.log()
    assert "config reload failed, still running on the last good config" in log
    assert f"{lm.config_path}:" in log
    # Fixing the file is picked up without a restart.
    later = bed.new_list(["y2@example.net"], posting="open")
    bed.smtp("carol@example.net", [later], message(to=later, sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert sorted(bed.sink.recipients()) == ["y1@example.net", "y2@example.net"]


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
    reply = bed.submit("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert (reply.code, reply.text) == (LIST_DOWN[0], LIST_DOWN[1].format(rcpt=lst)), reply


# -- a message split over several lists ------------------------------------------------
def test_a_failed_split_resubmission_gives_451_and_nothing_is_accepted(own_bed):
    """design.md: all re-submissions come before the message is changed; one failing
    tempfails the whole message, and the sender's retry is delivered whole."""
    bed = own_bed
    lm = bed.listmilter
    a = bed.new_list(["a1@example.net"], posting="open", name="alpha")
    b = bed.new_list(["b1@example.net"], posting="open", name="beta")
    data = message("split", "carol@example.net", f"{a}, {b}, person@example.net")
    # listmilter's outgoing: a port bound but never listening (the MTA "down" for re-submission).
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    good_port = lm.outgoing_port
    lm.outgoing_port = dead.getsockname()[1]
    lm.write_config()
    wait_until(lambda: lm.knows(a) and "config reloaded" in lm.log(), 15, interval=0.2, what="the reload")
    reply = bed.submit("carol@example.net", [a, "person@example.net", b], data)
    assert (reply.stage, reply.code, reply.text) == \
        ("END", 451, "4.3.0 listmilter: cannot split the message; try again later"), reply
    bed.settle()
    assert bed.sink.deliveries() == []
    assert f"status=deferred (cannot re-submit: smtp: 127.0.0.1:{lm.outgoing_port}:" in lm.log()
    mark = len(lm.log())
    lm.outgoing_port = good_port
    lm.write_config()
    wait_until(lambda: lm.knows(a) and "config reloaded" in lm.log()[mark:], 15, interval=0.2,
               what="the reload")
    dead.close()
    assert bed.submit("carol@example.net", [a, "person@example.net", b], data).code == 250
    bed.sink.wait_for_recipients(3)
    bed.settle()
    assert_each_once(bed, ["a1@example.net", "b1@example.net", "person@example.net"], data)


@pytest.mark.parametrize("own_bed", [{"reinject": False}], indirect=True)
def test_personal_copies_failing_part_way_give_451_and_the_retry_duplicates_only_those_sent(own_bed):
    """design.md: without outgoing.reinject the milter sends the copies itself; a failure
    after some copies were queued tempfails the post; the retry sends every copy again,
    so exactly those queued before are duplicated. (With it: tests/test_fanout.py.)"""
    bed = own_bed
    lm = bed.listmilter
    lm.extra["web"] = {"base_url": "https://lists.example.org"}     # one copy per member
    lm.write_config()
    members = ["p1@example.net", "p2@example.net", "p3@example.net", "p4@example.net"]
    lst = bed.new_list(members, posting="open")
    # Postfix refuses p3 for now: listmilter's third re-submission gets 450.
    bed.postfix.postconf("-e", "smtpd_recipient_restrictions = check_recipient_access "
                               "inline:{ { p3@example.net = 450 4.2.1 try later } }, "
                               "permit_mynetworks, reject_unauth_destination")
    bed.postfix.reload()
    wait_until(lambda: lm.knows(lst) and "config reloaded" in lm.log(), 15, interval=0.2, what="the reload")
    data = message("personal", "carol@example.net", lst)
    reply = bed.submit("carol@example.net", [lst], data)
    assert (reply.stage, reply.code, reply.text) == \
        ("END", 451, "4.3.0 listmilter: cannot split the message; try again later"), reply
    bed.settle()
    first = bed.sink.by_recipient()
    assert "p3@example.net" not in first and set(first) < set(members)
    assert all(len(v) == 1 for v in first.values())
    bed.postfix.postconf("-X", "smtpd_recipient_restrictions")
    bed.postfix.reload()
    assert bed.submit("carol@example.net", [lst], data).code == 250           # the retry
    bed.sink.wait_for_recipients(len(members) + len(first))
    bed.settle()
    got = bed.sink.by_recipient()
    assert {r: len(v) for r, v in got.items()} == {m: 2 if m in first else 1 for m in members}
    assert {m.message["Message-ID"] for v in got.values() for m in v} == {_message_id(data)}
    assert "expanded (personal copies)" in lm.log()


# -- the sendmail command ----------------------------------------------------------------
def test_milter_down_during_sendmail_command_submission_keeps_the_mail_until_it_is_back(own_bed):
    """The sendmail command has no RCPT check: with serve down, cleanup goes on without the
    milter (milter_default_action = accept), local(8) hands the list address to the pipe,
    which keeps it queued (never delivered unexpanded); once serve runs, the retry
    re-submits it through the milter and each member gets it once."""
    bed = own_bed
    lst = bed.new_list(["l1@example.net", "l2@example.net"], posting="open")
    data = message("local", "carol@example.net", lst)
    bed.listmilter.stop()
    proc = bed.postfix.sendmail(data, "carol@example.net", [lst])
    assert proc.returncode == 0, proc.stderr          # postdrop took it: the command cannot tell
    waiting = (f"to=<{re.escape(lst)}>, relay=listmilter, .*status=deferred \\(temporary failure. Command output: "
               "listmilter: listmilter serve is not running; the post goes through the milter once it runs")
    wait_until(lambda: re.search(waiting, bed.postfix.log()), 60, what="the pipe to keep the list address queued")
    assert not bed.postfix.queue_empty()
    assert bed.sink.deliveries() == [] and "status=sent" not in bed.postfix.log()
    bed.listmilter.start()
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True, capture_output=True)
    bed.sink.wait_for_recipients(2, timeout=120)
    bed.settle()
    assert_each_once(bed, ["l1@example.net", "l2@example.net"], data)


# -- an exception inside a callback -------------------------------------------------------
FAULTS = textwrap.dedent("""\
    # Loaded by Python at start (PYTHONPATH) in this test's serve only: the first
    # call of one step's function raises; later calls work (the sender's retry).
    import importlib
    import os
    fault = os.environ.get("LISTMILTER_TEST_FAULT")
    if fault:
        module, cls, name = {"eoh": ("listmilter.core.plan", None, "loop_reason"),
                             "eom": ("listmilter.core.plan", None, "expand_list"),
                             "data": ("listmilter.mta.milter", "ListMilter", "data")}[fault]
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        real, calls = getattr(owner, name), []

        def broken(*args, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected fault in " + fault)
            return real(*args, **kw)
        setattr(owner, name, broken)
    """)


@pytest.mark.parametrize("fault, stage, reply_text", [
    # The milter catches it: its own reply, and the traceback in its log.
    ("eoh", "END", "4.3.0 listmilter: internal error; try again later"),
    ("eom", "END", "4.3.0 listmilter: internal error; try again later"),
    # It escapes the milter (data() keeps no guard): pymilter answers for it, with the
    # same code; its traceback goes to serve's stderr.
    ("data", "DATA", "4.3.0 pymilter: untrapped exception in listmilter"),
])
def test_an_exception_in_a_callback_gives_451_4_3_0_and_nothing_is_accepted(own_bed, fault, stage, reply_text):
    bed = own_bed
    lm = bed.listmilter
    (lm.dir / "fault").mkdir()
    (lm.dir / "fault" / "sitecustomize.py").write_text(FAULTS)
    # The fault first, then whatever the suite runs with (a checkout on PYTHONPATH, or none).
    path = os.pathsep.join(p for p in (str(lm.dir / "fault"), os.environ.get("PYTHONPATH", "")) if p)
    lm.env.update(PYTHONPATH=path, LISTMILTER_TEST_FAULT=fault)
    lm.stop()
    lm.start()
    lst = bed.new_list(["x1@example.net"], posting="open")
    data = message(to=lst, sender="carol@example.net")
    reply = bed.submit("carol@example.net", [lst], data)
    assert (reply.stage, reply.code, reply.text) == (stage, 451, reply_text), reply
    bed.settle()
    assert bed.sink.deliveries() == []
    assert f"injected fault in {fault}" in (lm.stderr() if fault == "data" else lm.log())
    lm.forgive()                        # the traceback this test caused
    assert bed.submit("carol@example.net", [lst], data).code == 250      # the retry
    bed.sink.wait_for_recipients(1)
    bed.settle()
    assert_each_once(bed, ["x1@example.net"], data)
