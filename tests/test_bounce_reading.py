"""Reading mail to <list>-bounces@ (issue 14): every DSN shape real MTAs write, the ENVID
wherever it is, real bounces never dropped, bounded work, kept mail bounded and safely
named, and `listmilter bounces --explain`. No MTA: the pure reading, the kept-mail files
and the CLI in process or as a subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter import cli as cli_main
from listmilter.app import bounce_processing
from listmilter.core import addresses, bounces, config, envid, mailparse
from listmilter.core.model import MailingList
from listmilter.store import kept, site_secret
from tests.bed.listmilter import cli
from tests.conftest import dsn_message
from tests.test_fuzz import bounce_like, folded, hostile_bytes, scaled

DATA = Path(__file__).parent / "data" / "flufl-bounce"
SECRET = b"k" * 32
LIST = "dev@example.org"
POSTED = 1_800_000_000.0
ENVID = envid.make("Q1AB2", LIST, SECRET, POSTED)
HEAD = (b"From: MAILER-DAEMON@mx.example.test (Mail Delivery System)\nTo: dev-bounces@example.org\n"
        b"Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n")


def _report(ds_type: bytes, ds_body: bytes, cte: bytes = b"7bit", extra_part: bytes = b"") -> bytes:
    """A multipart/report whose delivery-status part has exactly `ds_body`."""
    return (b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"R\"\n\n"
            b"--R\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
            b"--R\nContent-Type: " + ds_type + b"\nContent-Transfer-Encoding: " + cte + b"\n\n" + ds_body +
            b"\n" + extra_part + b"--R--\n")


def _post_headers(extra: bytes = b"") -> bytes:
    return b"From: carol@example.net\nTo: dev@example.org\nSubject: a post\nMessage-ID: <p1@example.net>\n" + extra


PER_MESSAGE = b"Reporting-MTA: dns; mx.example.test\nOriginal-Envelope-Id: " + ENVID.encode() + b"\n"
BOB = b"Final-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 5.1.1\n" \
      b"Diagnostic-Code: smtp; 550 5.1.1 no such user\n"
CAROL = b"Final-Recipient: rfc822; carol@example.net\nAction: delayed\nStatus: 4.2.2\n"

# Each DSN shape of issue 14, carrying our ENVID: bob failed permanently, carol (where named) is delayed.
SHAPES = {
    # Blocks separated by a line of spaces (Python's parser folds it into one block).
    "space-separated blocks": HEAD + _report(b"message/delivery-status",
                                             PER_MESSAGE + b"  \n" + BOB + b" \t\n" + CAROL),
    # Final-Recipient with no address type, bare and in brackets.
    "untyped final-recipient": HEAD + _report(b"message/delivery-status", PER_MESSAGE + b"\n" + BOB.replace(
        b"rfc822; bob@example.net", b"<bob@example.net>") + b"\n" + CAROL.replace(b"rfc822; ", b"")),
    # Action before the recipient fields (Sun Internet Mail Server).
    "fields in any order": HEAD + _report(b"message/delivery-status", PER_MESSAGE + b"\nAction: failed\n"
                                          b"Status: 5.1.1\nOriginal-Recipient: rfc822;bob@example.net\n"
                                          b"Final-Recipient: rfc822;bob@sims-ms-daemon\n"),
    # The report inside multipart/mixed (Exchange, some gateways).
    "wrapped in multipart/mixed": HEAD.replace(b"MIME-Version: 1.0\n", b"MIME-Version: 1.0\n"
                                               b"Content-Type: multipart/mixed; boundary=\"M\"\n\n--M\n")
    + _report(b"message/delivery-status", PER_MESSAGE + b"\n" + BOB + b"\n" + CAROL) + b"\n--M--\n",
    # The report forwarded as message/rfc822 (a relay or a user passing it on).
    "forwarded as message/rfc822": HEAD + b"Content-Type: multipart/mixed; boundary=\"F\"\n\n--F\n"
    b"Content-Type: text/plain\n\nsee attached\n--F\nContent-Type: message/rfc822\n\n" + HEAD
    + _report(b"message/delivery-status", PER_MESSAGE + b"\n" + BOB + b"\n" + CAROL) + b"\n--F--\n",
    # RFC 6533: UTF-8 fields, which Python 3.11 does not parse as a delivery-status.
    "message/global-delivery-status": HEAD + _report(
        b"message/global-delivery-status", PER_MESSAGE + b"\n" + BOB.replace(b"no such user", "kein Empfänger".encode())
        + b"\n" + CAROL, b"8bit"),
    # Base64 and quoted-printable delivery-status parts (Python parses them as garbage headers).
    "base64 delivery-status": HEAD + _report(b"message/delivery-status",
                                             base64.encodebytes(PER_MESSAGE + b"\n" + BOB + b"\n" + CAROL), b"base64"),
    "quoted-printable delivery-status": HEAD + _report(b"message/delivery-status",
                                                       PER_MESSAGE + b"\n" + BOB + b"\n" + CAROL, b"quoted-printable"),
    # The ENVID only in the returned headers (text/rfc822-headers).
    "envid in text/rfc822-headers": HEAD + _report(
        b"message/delivery-status", b"Reporting-MTA: dns; mx.example.test\n\n" + BOB + b"\n" + CAROL,
        extra_part=b"--R\nContent-Type: text/rfc822-headers\n\n"
        + _post_headers(b"Original-Envelope-Id: " + ENVID.encode() + b"\n") + b"\n"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_dsn_shape_is_read_with_its_envid(name):
    report = bounces.read_bytes(SHAPES[name], null_sender=True)
    assert report.kind == bounces.DSN and report.envid == ENVID
    post = envid.parse(report.envid, LIST, SECRET)
    assert post is not None and post.posted_at == int(POSTED)
    assert report.failures[0].address == "bob@example.net" and report.failures[0].permanent
    assert report.failures[0].status == "5.1.1"
    if name != "fields in any order":
        assert [(f.address, f.permanent, f.status) for f in report.failures[1:]] == \
            [("carol@example.net", False, "4.2.2")]
    # Bound to our post and to a member who received it, but not to the member: a probe decides.
    explained = bounces.explain(report, post.posted_at, {"bob@example.net": (POSTED - 86400, True),
                                                         "carol@example.net": (POSTED - 86400, True)})
    assert [(f.binding, f.verdict) for f in explained.failures][0] == ("envid", bounces.Verdict.SUSPECT)
    assert all(f.verdict == bounces.Verdict.TEMPORARY for f in explained.failures[1:])


def test_a_report_inside_the_returned_message_is_not_read():
    """A post carrying a DSN as an attachment, returned in full by a real DSN: only the real
    report's recipients count (else the attachment's would borrow the real ENVID)."""
    attached = HEAD + (b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"Q\"\n\n"
                       b"--Q\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
                       b"Final-Recipient: rfc822; carol@example.net\nAction: failed\nStatus: 5.1.1\n\n--Q--\n")
    data = HEAD + _report(b"message/delivery-status", PER_MESSAGE + b"\n" + BOB,
                          extra_part=b"--R\nContent-Type: message/rfc822\n\n" + attached + b"\n")
    # The attached report alone is read (it is a report).
    assert [f.address for f in bounces.read_bytes(attached, True).failures] == ["carol@example.net"]
    report = bounces.read_bytes(data, null_sender=True)
    assert report.envid == ENVID and [f.address for f in report.failures] == ["bob@example.net"]


def test_global_delivery_status_reads_utf8_fields():
    data = HEAD + _report(b"message/global-delivery-status", PER_MESSAGE +
                          "\nOriginal-Recipient: utf-8; jörg@example.net\n"
                          "Final-Recipient: utf-8; jörg@example.net\nAction: failed\nStatus: 5.1.1\n\n"
                          "Final-Recipient: utf-8; bob@example.net\nAction: failed\nStatus: 5.1.1\n"
                          "Diagnostic-Code: smtp; 550 Empfänger unbekannt\n".encode(), b"8bit")
    report = bounces.read_bytes(data, null_sender=True)
    assert report.kind == bounces.DSN and report.envid == ENVID
    # A UTF-8 local part can be no member (listmilter's addresses are ASCII): skipped, not an error.
    assert [(f.address, f.permanent, f.diagnostic) for f in report.failures] == \
        [("bob@example.net", True, "smtp; 550 Empfänger unbekannt")]


def test_the_corpus_messages_without_a_recipient_block_keep_an_envid_inserted_into_them():
    for name in ("netscape_01.txt", "simple_31.txt"):
        raw = (DATA / name).read_bytes().replace(b"Reporting-MTA:", b"Original-Envelope-Id: " + ENVID.encode()
                                                 + b"\nReporting-MTA:", 1)
        report = bounces.read_bytes(raw, null_sender=True)
        assert report.envid == ENVID and report.failures, name


# -- never drop a real bounce; never read a reply or a complaint as a failure --------
def test_a_dsn_from_a_real_sender_marked_auto_submitted_is_a_bounce():
    data = dsn_message(ENVID, "Final-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 5.1.1")
    assert b"Auto-Submitted: auto-replied" in data
    report = bounces.read_bytes(data, null_sender=False)
    assert report.kind == bounces.DSN and [f.address for f in report.failures] == ["bob@example.net"]


def test_the_corpus_from_a_real_sender_marked_auto_submitted_is_still_read():
    """Before issue 14 every one of these was dropped as an auto-response."""
    wrong = []
    for name, _, permanent, temporary in _expected():
        report = bounces.read_bytes(b"Auto-Submitted: auto-replied\n" + (DATA / name).read_bytes(), False)
        if _split(report) != (permanent, temporary):
            wrong.append(name)
    assert wrong == []


@pytest.mark.parametrize("null_sender", [True, False])
def test_the_corpus_is_read_right_from_the_sender_its_return_path_records(null_sender):
    """Every sample's Return-Path names a real sender (a list's -admin@, MAILER-DAEMON@host): read
    as from it, the same addresses as from the null sender. (bench/bounce_corpus.py: 15 of 115
    before issue 14.)"""
    wrong = []
    for name, _, permanent, temporary in _expected():
        report = bounces.read_bytes((DATA / name).read_bytes(), null_sender)
        if _split(report) != (permanent, temporary):
            wrong.append(name)
    assert wrong == []


VACATION = (b"From: bob@example.net\nTo: dev-bounces@example.org\nSubject: Out of office\n"
            b"Auto-Submitted: auto-replied\n\nI am away; write to carol@example.net. Mail to me "
            b"failed? bob@example.net: 550 user unknown\n")
ARF = (b"From: abuse@mailbox.example\nTo: dev-bounces@example.org\nSubject: FW: complaint\n"
       b"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"A\"\n\n"
       b"--A\nContent-Type: text/plain\n\nThis is an email abuse report. Delivery failed for bob@example.net? "
       b"No: bob@example.net marked it as spam.\n\n"
       b"--A\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: x/1.0\nVersion: 1\n"
       b"Original-Rcpt-To: <bob@example.net>\n\n"
       b"--A\nContent-Type: text/rfc822-headers\n\n" + _post_headers() + b"\n--A--\n")


@pytest.mark.parametrize("null_sender", [True, False])
def test_arf_reports_and_auto_replies_are_never_permanent_failures(null_sender):
    arf = bounces.read_bytes(ARF, null_sender)
    assert arf.kind == bounces.FEEDBACK and arf.failures == ()
    # An ARF report wrapped in a bounce-looking subject from MAILER-DAEMON is still a complaint.
    arf2 = bounces.read_bytes(ARF.replace(b"abuse@mailbox.example", b"MAILER-DAEMON@mailbox.example")
                              .replace(b"FW: complaint", b"Undeliverable: complaint"), null_sender)
    assert arf2.kind == bounces.FEEDBACK and arf2.failures == ()
    if not null_sender:
        assert bounces.read_bytes(VACATION, null_sender).kind == bounces.AUTORESPONSE
    assert not any(f.permanent for f in bounces.read_bytes(VACATION, null_sender).failures
                   if f.address == "carol@example.net")


def test_a_feedback_report_is_kept_for_the_owners(tmp_path):
    cfg, store = _yaml_config(tmp_path, "    bounce_unrecognised: keep\n")
    mlist = store.get_list(LIST)
    outcome = bounce_processing.handle(cfg, store, site_secret(cfg), mlist, "abuse@mailbox.example", ARF,
                                       now=POSTED)
    assert outcome.kind == bounces.FEEDBACK and outcome.verdicts == ()
    assert outcome.kept and Path(outcome.kept).read_bytes() == ARF


# -- bounded work ---------------------------------------------------------------------
@pytest.mark.parametrize("line", [
    b"The following address failed: user%d@example.com: 550 5.1.1 unknown user at mx.example.net\n",
    b"<user%d@example.com>\n"])
def test_a_3_mb_null_sender_message_costs_well_under_a_second(line):
    body = b"".join(line % i for i in range(3 * 1024 * 1024 // len(line)))
    data = b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail\nTo: dev-bounces@example.org\n\n" + body
    assert len(data) > 3 * 1024 * 1024 - 200
    started = time.process_time()
    report = bounces.read_bytes(data, null_sender=True)
    spent = time.process_time() - started
    assert spent < 1.0, spent       # flufl.bounce over all 3 MB: 1.0-1.7 s here, ~20 s on the message
    assert report.kind in (bounces.HEURISTIC, bounces.UNRECOGNISED)


def test_a_dsn_naming_ten_thousand_members_is_read_whole_and_fast():
    """Postfix names every failed member of a post in one DSN: a dead domain on a big list."""
    text = "".join(f"<m{i:05d}@example.net>: host mx.example.net said: 550 5.1.1 no such user\n"
                   for i in range(10_000))
    fields = "".join(f"\nFinal-Recipient: rfc822; m{i:05d}@example.net\nAction: failed\nStatus: 5.1.1\n"
                     f"Diagnostic-Code: smtp; 550 5.1.1 no such user\n" for i in range(10_000))
    data = HEAD + (b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\n\n"
                   b"--B\nContent-Type: text/plain\n\n" + text.encode()
                   + b"\n--B\nContent-Type: message/delivery-status\n\n" + PER_MESSAGE + fields.encode() + b"\n--B--\n")
    assert len(data) > bounces.READ_LIMIT
    started = time.process_time()
    report = bounces.read_bytes(data, null_sender=True)
    assert time.process_time() - started < 3.0
    assert report.kind == bounces.DSN and report.envid == ENVID and len(report.failures) == 10_000
    assert report.failures[-1] == bounces.Failure("m09999@example.net", True, "5.1.1", "smtp; 550 5.1.1 no such user")


def test_the_heuristics_see_only_the_first_256_kb(monkeypatch):
    seen = []

    def recorder(msg):
        seen.append(len(msg.get_payload()))
        return set(), set()
    monkeypatch.setattr(bounces, "_flufl_failures", recorder)
    data = b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail\n\n" + b"x" * (3 * 1024 * 1024)
    bounces.read_bytes(data, True)
    assert seen and max(seen) <= bounces.HEURISTIC_LIMIT
    bounces.read_bytes(data[:10000], True)
    assert seen[-1] > 9000       # a small message is read whole


# -- kept mail ------------------------------------------------------------------------
@pytest.mark.parametrize("list_address", ["/etc/passwd@example.org", "../../../tmp/x@example.org", "..@example.org",
                                          ".hidden@example.org", "a/../../b@example.org", "dev@example.org"])
def test_kept_mail_never_leaves_state_dir(tmp_path, list_address):
    state = tmp_path / "state"
    state.mkdir()
    path, cut = kept.keep(str(state), list_address, b"Subject: x\n\nbody\n", 1024)
    real = Path(path).resolve()
    assert real.parent.parent == (state / "bounces").resolve()
    name = kept.folder_name(list_address)
    assert "/" not in name and name not in (".", "..") and not name.startswith(".")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and not cut
    assert stat.S_IMODE(os.stat(real.parent).st_mode) & 0o027 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


@pytest.mark.parametrize("list_address", ["/etc/passwd@example.org", "../../../tmp/x@example.org",
                                          ".hidden@example.org", "dev@example.org"])
def test_archived_posts_never_leave_state_dir(tmp_path, list_address):
    """The archive names its folder as kept mail does (statedir.list_folder_name), and writes 0640."""
    from listmilter.store import archive
    state = tmp_path / "state"
    state.mkdir()
    path = Path(archive.add(str(state), list_address, b"Subject: x\n\nbody\n", "Q1"))
    assert path.resolve().parent.parent.parent == (state / "archive").resolve()
    assert path.parent.name == "new" and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert [p for _, p in archive.messages(str(state), list_address)] == [str(path)]


def test_kept_files_are_named_by_content_capped_and_pruned(tmp_path):
    state = str(tmp_path)
    old_umask = os.umask(0)        # the mode must not depend on the caller's umask
    try:
        a, _ = kept.keep(state, LIST, b"A" * 10, 1024)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o640
    again, _ = kept.keep(state, LIST, b"A" * 10, 1024)
    assert again == a and Path(a).name == __import__("hashlib").sha256(b"A" * 10).hexdigest() + ".eml"
    big, cut = kept.keep(state, LIST, b"B" * 5000, 1024)
    assert cut and os.path.getsize(big) == 1024
    now = time.time()
    os.utime(a, (now - 40 * 86400, now - 40 * 86400))
    assert kept.prune(state, LIST, now, 30, 10**9) == [a]
    c, _ = kept.keep(state, LIST, b"C" * 1000, 1024)
    os.utime(big, (now - 100, now - 100))
    # Over a 1500-byte quota: the oldest (big) goes, the newest stays.
    assert kept.prune(state, LIST, now, 30, 1500, keep_path=c) == [big]
    assert os.path.exists(c)


def test_kept_to_delete_is_retention_then_oldest_first_and_spares_the_new_file():
    files = [("old", 10, 0.0), ("a", 50, 900.0), ("b", 50, 950.0), ("new", 50, 1000.0)]
    assert bounces.kept_to_delete(files, 1000.0, 500.0, 10**6) == ["old"]
    assert bounces.kept_to_delete(files, 1000.0, 500.0, 100) == ["old", "a"]
    assert bounces.kept_to_delete(files, 1000.0, 500.0, 10, keep="new") == ["old", "a", "b"]


def test_kept_mail_settings_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  bounce_kept_days: 30\n  bounce_kept_quota_mb: 0\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert f"{path}:3:" in str(info.value) and "bounce_kept_quota_mb" in str(info.value)
    path.write_text("defaults:\n  bounce_kept_max_kb: 64\n")
    ls = config.load(str(path)).list_settings({})
    assert (ls.bounce_kept_max_kb, ls.bounce_kept_days, ls.bounce_kept_quota_mb) == (64, 30, 100)


def test_an_unrecognised_message_is_kept_cut_to_the_lists_cap(tmp_path):
    cfg, store = _yaml_config(tmp_path, "    bounce_kept_max_kb: 1\n    bounce_unrecognised: keep\n")
    data = b"From: someone@example.net\nSubject: hello\n\n" + b"x" * 5000
    outcome = bounce_processing.handle(cfg, store, site_secret(cfg), store.get_list(LIST), "someone@example.net",
                                       data, now=POSTED)
    assert outcome.kept and os.path.getsize(outcome.kept) == 1024
    assert Path(outcome.kept).parent == Path(kept.folder(cfg.state_dir, LIST))


# -- listmilter bounces --explain ------------------------------------------------------
def _expected():
    for line in (DATA / "expected.tsv").read_text().splitlines():
        if not line.startswith("#"):
            name, kind, permanent, temporary = line.split("\t")
            yield name, kind, frozenset(permanent.split()), frozenset(temporary.split())


def _split(report) -> tuple[frozenset, frozenset]:
    return (frozenset(f.address for f in report.failures if f.permanent),
            frozenset(f.address for f in report.failures if not f.permanent))


@pytest.mark.parametrize("name,kind,permanent,temporary", [pytest.param(*e, id=e[0]) for e in _expected()])
def test_explain_reads_every_message_of_the_flufl_bounce_corpus(name, kind, permanent, temporary):
    """Expected addresses from flufl.bounce's own detector tests (expected.tsv); no list named,
    so nothing is bound and every permanent failure is `unverified`."""
    result = bounces.explain(bounces.read_bytes((DATA / name).read_bytes(), True), None, None).as_json()
    assert result["kind"] == kind
    got = result["failures"]
    assert {f["address"] for f in got if f["permanent"]} == permanent
    assert {f["address"] for f in got if not f["permanent"]} == temporary
    assert all(f["binding"] == "none" for f in got)
    assert all(f["verdict"] == ("unverified" if f["permanent"] else "temporary") for f in got)


def _yaml_config(tmp_path, list_extra: str = ""):
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nstore:\n  backend: yaml\nlists:\n  {LIST}:\n"
                    f"    members: [bob@example.net, carol@example.net]\n{list_extra}")
    cfg = config.load(str(path))
    from listmilter.store import open_store
    return cfg, open_store(cfg)


def test_explain_cli_json_binds_our_envid_and_scores_a_member(tmp_path):
    cfg, store = _yaml_config(tmp_path)
    store.close()
    our = envid.make("Q9ZZ", LIST, site_secret(cfg), time.time())
    data = dsn_message(our, "Final-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 5.1.1",
                       "Final-Recipient: rfc822; carol@example.net\nAction: delayed\nStatus: 4.4.1",
                       "Final-Recipient: rfc822; stranger@example.net\nAction: failed\nStatus: 5.1.1")
    msg = tmp_path / "dsn.eml"
    msg.write_bytes(b"Return-Path: <>\n" + data)
    proc = cli(Path(cfg.path), "bounces", "--explain", str(msg), "--json")
    assert json.loads(proc.stdout) == {"kind": "dsn", "failures": [
        {"address": "bob@example.net", "status": "5.1.1", "permanent": True, "binding": "envid", "verdict": "suspect"},
        {"address": "carol@example.net", "status": "4.4.1", "permanent": False, "binding": "envid",
         "verdict": "temporary"},
        {"address": "stranger@example.net", "status": "5.1.1", "permanent": True, "binding": "envid",
         "verdict": "not-member"}]}
    text = cli(Path(cfg.path), "bounces", LIST, "--explain", "-", input=msg.read_text()).stdout
    assert "kind: dsn" in text and f"envid: {our} (issued by this site for {LIST})" in text
    assert "<bob@example.net> 5.1.1 permanent, binding envid: suspect: bound to a post by its ENVID at most" in text
    assert "gets one probe message" in text
    # A forged ENVID binds nothing: the member is still only a suspect (a probe decides); an
    # empty file is no error.
    forged = msg.read_bytes().replace(our.encode(), our[:-20].encode() + b"0" * 4 + our[-16:].encode())
    msg.write_bytes(forged)
    result = json.loads(cli(Path(cfg.path), "bounces", LIST, "--explain", str(msg), "--json").stdout)
    assert {(f["binding"], f["verdict"]) for f in result["failures"] if f["permanent"]} == \
        {("none", "suspect"), ("none", "not-member")}
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    proc = cli(Path(cfg.path), "bounces", "--explain", str(empty), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"kind": "unrecognised", "failures": []}
    missing = cli(Path(cfg.path), "bounces", "--explain", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 66 and "Traceback" not in missing.stderr


def test_explain_cli_binds_by_the_address_delivered_to_a_personal_copy_s_or_a_probe_s(tmp_path):
    """A saved message delivered to `<list>-bounces+CODE@` (Delivered-To, as Postfix's local(8)
    writes it) is explained as deliver handles it: bound to the member by the address."""
    from listmilter.core import probes, verp
    from listmilter.store.bounce_records import BounceDB
    cfg, store = _yaml_config(tmp_path)
    store.close()
    secret = site_secret(cfg)
    ndr = (b"Return-Path: <>\nFrom: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\n"
           b"Sorry, your mail could not be delivered.\n")
    sent = float(int(time.time()))
    copy_sender = verp.make(LIST, "bob@example.net", "Q9ZZ", sent, secret)
    probe_sender = probes.make(LIST, "bob@example.net", sent, secret)
    assert copy_sender and probe_sender
    msg = tmp_path / "verp.eml"
    msg.write_bytes(f"Delivered-To: {copy_sender}\n".encode() + ndr)
    got = json.loads(cli(Path(cfg.path), "bounces", "--explain", str(msg), "--json").stdout)
    assert got["failures"] == [{"address": "bob@example.net", "status": "", "permanent": True, "binding": "verp",
                                "verdict": "scored"}]
    text = cli(Path(cfg.path), "bounces", "--explain", str(msg)).stdout
    assert "<bob@example.net> - permanent, binding verp: scored" in text
    # A probe's address binds its member only while the probe is in flight, as in deliver.
    msg.write_bytes(f"Delivered-To: {probe_sender}\n".encode() + ndr)
    got = json.loads(cli(Path(cfg.path), "bounces", "--explain", str(msg), "--json").stdout)
    assert got["failures"] == [] and got["kind"] == "unrecognised"      # plain bounce mail: kept
    db = BounceDB(str(cfg.state_dir))
    try:
        assert db.start_probe(LIST, "bob@example.net", sent, 7) == "probe"
    finally:
        db.close()
    got = json.loads(cli(Path(cfg.path), "bounces", "--explain", str(msg), "--json").stdout)
    assert got["failures"] == [{"address": "bob@example.net", "status": "", "permanent": True, "binding": "probe",
                                "verdict": "probe-bounced"}]
    # A forged code binds nobody: read as mail to the plain bounce address.
    msg.write_bytes(f"Delivered-To: {copy_sender[:-20]}aaaa{copy_sender[-16:]}\n".encode() + ndr)
    got = json.loads(cli(Path(cfg.path), "bounces", "--explain", str(msg), "--json").stdout)
    assert all(f["binding"] != "verp" for f in got["failures"])


@pytest.fixture(scope="module")
def explain_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    cfg, store = _yaml_config(tmp)
    store.close()
    site_secret(cfg)
    return cfg.path


def _explain_in_process(config_path: str, data: bytes, as_json: bool) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main.main(["-c", config_path, "bounces", LIST, "--explain", "-"]
                                 + (["--json"] if as_json else []))
    finally:
        sys.stdin = stdin
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue()


nested = st.recursive(hostile_bytes, lambda inner: st.builds(
    lambda ctype, body: b"MIME-Version: 1.0\nContent-Type: " + ctype + b"; boundary=Z\n\n--Z\nContent-Type: "
    b"message/delivery-status\n\n" + body + b"\n--Z--\n",
    st.sampled_from([b"multipart/report", b"multipart/mixed", b"message/rfc822", b"message/global-delivery-status"]),
    inner), max_leaves=6)
status_fields = st.lists(st.sampled_from([
    b"Final-Recipient: rfc822; bob@example.net", b"Final-Recipient: <bob@example.net>", b"Original-Recipient: utf-8;",
    b"Action: failed", b"Action: delayed", b"Status: 5.1.1", b"Status: \xff", b" ", b"\t", b"",
    b"Diagnostic-Code: x\n y",
    b"Original-Envelope-Id: " + ENVID.encode(), b"Final-Recipient: rfc822; \xc3\xa9@example.net"]), max_size=40)
delivery_status = st.builds(
    lambda ctype, cte, fields: HEAD + _report(ctype, b"\n".join(fields), cte),
    st.sampled_from([b"message/delivery-status", b"message/global-delivery-status"]),
    st.sampled_from([b"7bit", b"8bit", b"base64", b"quoted-printable", b"\xff"]), status_fields)


@scaled(0.15)      # a whole CLI run (config, store, secret) per example
@given(st.one_of(bounce_like, nested, delivery_status, folded(hostile_bytes), hostile_bytes), st.booleans())
@example(b"\xff" * 10, True)
@example(b"Content-Type: message/delivery-status\n\n" + b"Final-Recipient: a@b.c\n \n" * 5000, False)
def test_explain_never_fails_on_any_input(explain_config, data, as_json):
    code, out = _explain_in_process(explain_config, data, as_json)
    assert code == 0
    if as_json:
        result = json.loads(out)
        assert set(result) == {"kind", "failures"} and result["kind"] in set(bounces.Kind)
        for f in result["failures"]:
            assert set(f) == {"address", "status", "permanent", "binding", "verdict"}
            assert addresses.is_valid(f["address"]) and isinstance(f["permanent"], bool)
            assert f["binding"] in bounces.BINDINGS
    else:
        assert out.startswith("kind: ")


@scaled(0.5)
@given(st.one_of(nested, delivery_status), st.booleans())
def test_reading_reports_answers_for_hostile_structures(data, null_sender):
    report = bounces.read_bytes(data, null_sender)
    assert report.kind in set(bounces.Kind) and len(report.envid) <= 100
    for f in report.failures:
        assert addresses.is_valid(f.address) and "\n" not in f.status + f.diagnostic
    assert mailparse.parse(data) is not None


def test_explain_is_documented():
    root = Path(__file__).parent.parent
    assert "\\-\\-explain" in (root / "man" / "listmilter.8").read_text()
    assert "--explain" in (root / "docs" / "bounces.md").read_text()
    assert MailingList       # the model the CLI looks members up with
