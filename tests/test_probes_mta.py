"""Bounce probes in the real bed (issue 14): what binds a failure to a member.

A remote that accepts a post and mails a non-DSN report (an Exchange-style NDR) to the
bounce address later; a member who forges DSNs, with the genuine ENVIDs their own server
saw, for every other member: in both, the member named gets a probe, and only a probe that
bounces acts. Everything goes through the real Postfix and the aiosmtpd sink.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import dsn_message
from tests.test_bounces import DAY, _as_pipe_user, _bounce_lines, _db, _mails, _members, _post, _wait_bounce

# Starts private MTAs and listmilter serve (the mta tier, docs/testing.md).
pytestmark = pytest.mark.mta


def exchange_ndr(to: str, member: str, subject: str) -> bytes:
    """A non-delivery report as old Microsoft Exchange servers write them: no DSN part,
    the failed address in words (what flufl.bounce's Exchange detector reads)."""
    return (f"From: System Administrator <postmaster@mail01.example.net>\n"
            f"To: <{to}>\n"
            f"Subject: Undeliverable: {subject}\n"
            f"Date: Thu, 03 Dec 2026 10:00:05 +0000\n"
            f"MIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=\"us-ascii\"\n\n"
            f"Your message\n\n"
            f"  To:      {member}\n"
            f"  Subject: {subject}\n"
            f"  Sent:    Thu, 03 Dec 2026 10:00:00 +0000\n\n"
            f"did not reach the following recipient(s):\n\n"
            f"{member} on Thu, 03 Dec 2026 10:00:05 +0000\n"
            f"    The recipient name is not recognized\n"
            f"    The MTS-ID of the original message is: c=us;a= ;p=example;l=MAIL01-261203100000Z-1\n"
            f"    MSEXCH:IMS:Example:Site:MAIL01 0 (000C05A6) Unknown Recipient\n").encode()


def _copy(bed, to: str, subject: str):
    """The message the sink took for `to` with `subject` (waiting for it)."""
    return wait_until(lambda: next((m for m in bed.sink.for_recipient(to)
                                    if str(m.message["Subject"]) == subject), None), 60,
                      what=f"{subject!r} for {to}")


def _probes_to(bed, address: str, lst: str) -> list:
    return [m for m in bed.sink.for_recipient(address)
            if str(m.message["Subject"]) == f"Checking your address for {lst}"]


def test_a_remote_that_accepts_then_mails_an_exchange_ndr_the_probe_decides(clean_bed, owner):
    bed = clean_bed
    dead, live = "dead@example.net", "live@example.net"
    lst = bed.new_list([dead, live], posting="open", owners=(owner,), bounce_action="remove")
    local = lst.split("@")[0]
    _post(bed, lst, "accepted, then bounced")
    # The remote took the post for dead@ and mails its report later, to the post's sender.
    post = _copy(bed, dead, "accepted, then bounced")
    bed.smtp("", [post.mail_from], exchange_ndr(post.mail_from, dead, "accepted, then bounced"))
    (line,) = _wait_bounce(bed, lst, 1)
    assert f"to=<{local}-bounces@" in line and re.search(rf"<{dead}> \S+ suspect \(probe sent\)", line), line
    # The probe is taken too, and the remote's NDR of it comes back to the probe's own address.
    (probe,) = wait_until(lambda: _probes_to(bed, dead, lst), 60, what="the probe")
    assert probe.mail_from.startswith(f"{local}-bounces+probe-")
    bed.smtp("", [probe.mail_from], exchange_ndr(probe.mail_from, dead, f"Checking your address for {lst}"))
    probed = _wait_bounce(bed, lst, 2)[-1]
    assert f"to=<{probe.mail_from}>" in probed and f"<{dead}>" in probed and "probe-bounced" in probed, probed
    assert [m.message["Subject"] for m in _mails(bed, owner, 1)] == [f"{dead} removed from {lst} (bounces)"]
    assert _members(bed, lst) == [live]

    # A forged NDR for a member who never bounced: a probe, delivered, and nothing else.
    bed.smtp("", [post.mail_from], exchange_ndr(post.mail_from, live, "accepted, then bounced"))
    forged = _wait_bounce(bed, lst, 3)[-1]
    assert re.search(rf"<{live}> \S+ suspect \(probe sent\)", forged), forged
    wait_until(lambda: _probes_to(bed, live, lst), 60, what="the probe to the live member")
    bed.settle()
    assert len(_bounce_lines(bed, lst)) == 3 and _members(bed, lst) == [live]
    assert _db(bed, "SELECT count(*) FROM scores WHERE key=?", live) == [(0,)]
    assert len(bed.sink.for_recipient(owner)) == 1


def test_a_member_forging_dsns_for_every_other_member_with_real_envids_removes_nobody(clean_bed, owner):
    """The attack of issue 14: a member who runs their own mail server sees the ENVID of every
    post, and forges a DSN with each naming every other member. Before probes, five of them
    disabled all the others. Now each victim gets one probe (delivered: their address works),
    nobody is scored, disabled, removed or reported, and the log says why."""
    bed = clean_bed
    mallory = "mallory@evil.example"
    victims = [f"m{i:02d}@site{i % 3}.example" for i in range(24)]
    lst = bed.new_list([*victims, mallory], posting="open", owners=(owner,), bounce_action="remove",
                       bounce_threshold=1, bounce_probe_days=7)
    bounce_to = lst.replace("@", "-bounces@")
    for n in range(5):
        _post(bed, lst, f"post {n}")
    # Mallory's server sees each post's ENVID in its MAIL FROM (RFC 3461). (The sink, aiosmtpd,
    # upper-cases MAIL options; the bed's queue ids are upper-case hex, the rest lower case.)
    copies = [_copy(bed, mallory, f"post {n}") for n in range(5)]
    seen = [next(o.split("=", 1)[1] for o in c.mail_options if o.startswith("ENVID=")) for c in copies]
    envids = [f"{queue_id}.{rest.lower()}" for queue_id, _, rest in (e.partition(".") for e in seen)]
    assert len(set(envids)) == 5 and all(f"{e.partition('.')[0]}: list=<{lst}>" in bed.listmilter.log()
                                         for e in envids)
    blocks = [f"Original-Recipient: rfc822;{v}\nFinal-Recipient: rfc822; {v}\nAction: failed\nStatus: 5.1.1\n"
              f"Diagnostic-Code: smtp; 550 5.1.1 <{v}>: no such user" for v in victims]
    for made in envids:
        bed.smtp("", [bounce_to], dsn_message(made, *blocks, to=bounce_to))
    lines = _wait_bounce(bed, lst, 5)
    # Postfix hands the five to deliver side by side: one probe per victim, whichever came first.
    assert sum(line.count(" suspect (probe sent)") for line in lines) == len(victims)
    assert sum(line.count(" suspect (a probe is in flight already)") for line in lines) == 4 * len(victims)
    # Failures at three domains in one report from an SMTP client: logged as suspect, each time.
    assert bed.listmilter.log().count("suspect report: failures at several receiving domains") == 5
    probes = wait_until(lambda: len(got := [m for v in victims for m in _probes_to(bed, v, lst)]) >= len(victims)
                        and got, 120, what="one probe per victim")
    bed.settle()
    assert sorted(r for m in probes for r in m.rcpt_tos) == sorted(victims)      # one each, no more
    assert _members(bed, lst) == sorted([*victims, mallory])
    assert _db(bed, "SELECT count(*) FROM scores WHERE list=?", lst) == [(0,)]
    assert bed.sink.for_recipient(owner) == []
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert listing.count("probe in flight:") == len(victims) and "no bouncing members" in listing
    # The probes that did not bounce clear after bounce_probe_days; nobody was touched.
    out = _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={time.time() + 7 * DAY + 60}))")
    assert out.count(f"({lst}) did not bounce in 7 days: suspicion cleared") == len(victims)
    assert _db(bed, "SELECT count(*) FROM probes WHERE list=?", lst) == [(0,)]
    assert _members(bed, lst) == sorted([*victims, mallory])


def test_reports_from_another_host_send_at_most_bounce_probes_per_day_and_our_mta_s_are_not_limited(clean_bed,
                                                                                                      owner):
    """One forged report naming every member must not make the list mail every member: past the
    list's bounce_probes_per_day (for reports from other hosts) the suspicions are kept for the
    owners, unprobed. The DSNs of this host's own MTA are not limited: a dead member is still
    probed, and removed when the probe bounces."""
    bed = clean_bed
    named = [f"m{i}@site.example" for i in range(8)]
    dead = "dead@example.net"
    lst = bed.new_list([*named, dead], posting="open", owners=(owner,), bounce_action="remove",
                       bounce_probes_per_day=3, bounce_unrecognised="keep")
    bounce_to = lst.replace("@", "-bounces@")
    blocks = [f"Final-Recipient: rfc822; {v}\nAction: failed\nStatus: 5.1.1\n"
              f"Diagnostic-Code: smtp; 550 5.1.1 <{v}>: no such user" for v in named]
    bed.smtp("", [bounce_to], dsn_message("", *blocks, to=bounce_to))
    (line,) = _wait_bounce(bed, lst, 1)
    assert line.count(" suspect (probe sent)") == 3 and line.count(" unprobed") == 5, line
    assert ", kept " in line, line
    assert "probe budget spent: 3 probes in the last day for reports from other hosts" in bed.listmilter.log() \
        + bed.deliver_log()
    probes = wait_until(lambda: len(got := [m for v in named for m in _probes_to(bed, v, lst)]) >= 3 and got,
                        60, what="three probes")
    kept = cli(bed.listmilter.config_path, "bounces", lst, "--kept").stdout
    assert "the list sent bounce_probes_per_day probes for reports from other hosts" in kept, kept

    # A post: Postfix's own DSN for dead@ (no SMTP client) is probed though the day's budget is spent.
    bed.sink.post_replies[dead] = "550 5.1.1 <dead@example.net>: no such user here"
    _post(bed, lst, "after the forged report")
    wait_until(lambda: dead not in _members(bed, lst), 120, interval=0.5, what="dead@ removed by its probe's DSN")
    lines = _bounce_lines(bed, lst)
    assert any(re.search(rf"<{dead}> 5\.1\.1 suspect \(probe sent\)", x) for x in lines), lines
    assert any("probe-bounced" in x and f"<{dead}>" in x for x in lines), lines
    bed.settle()
    assert len(probes) == 3 and len([m for v in named for m in _probes_to(bed, v, lst)]) == 3
    assert _members(bed, lst) == sorted(named)
    assert _db(bed, "SELECT count(*) FROM scores WHERE list=?", lst) == [(0,)]
