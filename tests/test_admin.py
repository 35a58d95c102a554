"""What an admin sees in the real bed: the log linking every queue id of a post,
`listmilter trace`, archives (exported and published with MHonArc), the
config picked up without mail, `listmilter check --live`."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import message

ROOT = Path(__file__).resolve().parent.parent


def doc_block(path: Path, after: str) -> list[str]:
    """The indented command lines of the first block after the paragraph that says `after`."""
    text = path.read_text()
    rest = text[text.index(after):].split("\n")
    lines, started = [], False
    for line in rest[1:]:
        if line.startswith("    "):
            started = True
            lines.append(line[4:])
        elif started and line.strip():
            break
    return [x for x in lines if x.strip()]


def _trace(bed, queue_id: str) -> subprocess.CompletedProcess:
    """`listmilter trace` over Postfix's log and listmilter's own (the bed keeps them apart)."""
    return cli(bed.listmilter.config_path, "trace", queue_id, "--log", str(bed.postfix.dir / "maillog"),
               "--log", str(bed.listmilter.log_path), "--log", str(bed.postfix.pipe_log), check=False)


def _lines(bed, pattern: str) -> list[str]:
    return [line for line in bed.deliver_log().splitlines() if re.search(pattern, line)]


def _queue_id(line: str) -> str:
    return re.search(r"\]: ([0-9A-Za-z]+): ", line).group(1)


def _set_web(bed, base_url: str | None) -> None:
    """web.base_url on or off, and wait until serve has re-read the config (no mail needed)."""
    mark = len(bed.listmilter.log())
    if base_url:
        bed.listmilter.extra["web"] = {"base_url": base_url}
    else:
        bed.listmilter.extra.pop("web", None)
    bed.listmilter.write_config()
    wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the config reload")


def test_a_split_post_names_its_copy_and_trace_follows_it_from_either_id(clean_bed):
    bed = clean_bed
    a = bed.new_list(["ta1@example.net"], posting="open", name="alpha")
    b = bed.new_list(["tb1@example.net", "tb2@example.net"], posting="open", name="beta")
    bed.smtp("carol@example.net", [a, b], message("to two lists", "carol@example.net", a))
    bed.sink.wait_for_recipients(3)
    bed.settle()
    (split,) = _lines(bed, rf"list=<{re.escape(b)}>.*status=split")
    post, copy = _queue_id(split), split.rpartition("queued_as=")[2]
    assert re.fullmatch(r"[0-9A-F]{6,}", copy), split
    # The copy came back through the milter as a post of its own, under that id.
    assert _lines(bed, rf"\]: {copy}: list=<{re.escape(b)}>.*status=expanded, members=2")
    # The sender got no unknown[...]... twice: Postfix's own form of the client.
    (expanded,) = _lines(bed, rf"\]: {post}: list=<{re.escape(a)}>.*status=expanded")
    assert re.search(r"client=(localhost|unknown)\[127\.0\.0\.1\], ", expanded), expanded
    for start in (post, copy):
        proc = _trace(bed, start)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert f"post {post}: 2 queue ids ({post} {copy}); deliveries: 3 sent" in out, out
        for member in ("ta1@example.net", "tb1@example.net", "tb2@example.net"):
            assert re.search(rf"to=<{member}>.*status=sent", out), member
    missing = _trace(bed, "ABCDEF123")
    assert missing.returncode == 1 and "ABCDEF123 is not in " in missing.stderr


def test_personal_copies_are_linked_to_the_post_and_their_bounce_too(clean_bed):
    bed = clean_bed
    _set_web(bed, "https://lists.example.test")
    try:
        lst = bed.new_list(["pc1@example.net", "pc2@example.net", "pcdead@example.net"], posting="open",
                           archive="true")
        bed.sink.post_replies["pcdead@example.net"] = "550 5.1.1 <pcdead@example.net>: no such user"
        bed.smtp("carol@example.net", [lst], message("personal", "carol@example.net", lst))
        bed.sink.wait_for_recipients(2)
        wait_until(lambda: "role=bounces" in bed.deliver_log(), 60, what="the DSN of pcdead@ to come back")
        bed.settle()
    finally:
        _set_web(bed, None)
    (copies,) = _lines(bed, rf"list=<{re.escape(lst)}>, copies=3, queued_as=")
    post = _queue_id(copies)
    ids = copies.rpartition("queued_as=")[2].split()
    assert len(ids) == 3 and post not in ids
    # The post waited in the queue for its fan-out address, and went to the pipe once its copies were queued.
    assert re.search(rf"{post}: to=<[^>]*-fanout\+[0-9a-z-]+@example.org>.*relay=listmilter.*status=sent",
                     bed.postfix.log())
    proc = _trace(bed, ids[-1])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Sent: the two copies, and the post itself to its fan-out address (the pipe).
    assert f"post {post}: " in out and "deliveries: 1 bounced, 3 sent" in out, out
    assert "status=fanned out (personal copies)" in out and "sender non-delivery notification" in out
    # The DSN came to pcdead@'s own VERP sender, <list>-bounces+CODE@ (docs/bounces.md).
    assert re.search(r"deliver: to=<[^>]*-bounces\+[0-9a-z-]+@example.org>.*"
                     r"verp dsn: <pcdead@example.net> 5.1.1 scored", out), out
    # The archive has the post as the members got it, without anyone's one-click link.
    (path,) = (bed.listmilter.state_dir / "archive" / lst / "new").iterdir()
    kept = path.read_bytes()
    assert b"List-Unsubscribe: <mailto:" in kept and b"https://lists.example.test/u/" not in kept
    assert b"\r\n" not in kept and b"Subject: personal" in kept


def test_archive_keeps_posts_as_they_went_out_and_mhonarc_publishes_the_export(clean_bed, tmp_path):
    bed = clean_bed
    lst = bed.new_list(["ar1@example.net"], posting="open", subject_prefix="[ar] ", archive="true")
    other = bed.new_list(["ar2@example.net"], posting="open")
    body = "First line.\nFrom the archive, a line mbox must quote.\n"
    bed.smtp("carol@example.net", [lst], message("kept one", "carol@example.net", lst, body=body))
    bed.smtp("carol@example.net", [other], message("not kept", "carol@example.net", other))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    folder = bed.listmilter.state_dir / "archive" / lst
    assert [p.name for p in (folder / "tmp").iterdir()] == []
    (path,) = (folder / "new").iterdir()
    kept = path.read_text()
    assert "Subject: [ar] kept one" in kept and f"List-Id: <{lst.replace('@', '.')}>" in kept
    assert kept.rstrip("\n").endswith(body.rstrip("\n"))
    assert not (bed.listmilter.state_dir / "archive" / other).exists()

    index = cli(bed.listmilter.config_path, "archive", lst)
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d\tcarol@example.net\t\[ar\] kept one\t{re.escape(str(path))}\n",
                        index.stdout), index.stdout
    assert f"{lst}: 1 archived post" in index.stderr
    later = cli(bed.listmilter.config_path, "archive", lst, "--since", "2999-01-01")
    assert later.stdout == "" and f"{lst} since 2999-01-01: 0 archived posts" in later.stderr
    bad = cli(bed.listmilter.config_path, "archive", lst, "--since", "yesterday", check=False)
    assert bad.returncode == 64 and "not a date" in bad.stderr
    nothing = cli(bed.listmilter.config_path, "archive", other)
    assert "0 archived posts (archive is off for this list" in nothing.stderr

    # docs/archives.md's lines, as written there, on this list and in private folders.
    web, mbox = tmp_path / "www", tmp_path / "dev.mbox"
    lines = doc_block(ROOT / "docs" / "archives.md", "(tests/test_admin.py runs these lines)")
    assert lines[0] == "apt-get install mhonarc"        # bootstrap installs it
    script = "\n".join(lines[1:]).replace("dev@example.org", lst).replace(
        "/var/www/lists/dev", str(web)).replace("/var/lib/listmilter/dev.mbox", str(mbox)).replace(
        "listmilter archive", " ".join(_listmilter(bed)) + " archive")
    for _ in range(2):      # again, as from cron: MHonArc adds nothing it already has
        proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert mbox.read_text().startswith(f"From {lst.replace('@', '-bounces@')} ")
    assert "\n>From the archive" in mbox.read_text()
    pages = sorted(p.name for p in web.glob("msg*.html"))
    assert pages == ["msg00000.html"], pages
    page = (web / "msg00000.html").read_text()
    assert "[ar] kept one" in page and "From the archive, a line mbox must quote." in page
    assert "[ar] kept one" in (web / "maillist.html").read_text()


def test_a_post_goes_out_when_its_archive_cannot_be_written(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["af1@example.net"], posting="open", archive="true")
    (bed.listmilter.state_dir / "archive").mkdir(exist_ok=True)
    (bed.listmilter.state_dir / "archive" / lst).write_text("a file where the Maildir should be\n")
    bed.smtp("carol@example.net", [lst], message("still goes", "carol@example.net", lst))
    bed.sink.wait_for_recipients(1)
    assert bed.sink.recipients() == ["af1@example.net"]
    (line,) = _lines(bed, rf"list=<{re.escape(lst)}>.*status=not archived")
    assert "the post went out" in line


def _listmilter(bed) -> list[str]:
    import sys
    return [sys.executable, "-m", "listmilter", "-c", str(bed.listmilter.config_path)]


def test_an_edited_config_is_picked_up_within_seconds_without_mail(clean_bed):
    bed = clean_bed
    mark = len(bed.listmilter.log())
    started = time.monotonic()
    bed.listmilter.extra["defaults"] = {"owner_notices": False}
    try:
        bed.listmilter.write_config()
        wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the reload")
        assert time.monotonic() - started < 5
    finally:
        del bed.listmilter.extra["defaults"]
        bed.listmilter.write_config()


def test_check_live_proves_the_path_and_names_each_part_that_is_down(clean_bed, tmp_path):
    bed = clean_bed
    lm = bed.listmilter
    bed.new_list(["lv1@example.net"], owners=("boss@example.com",))
    env = {"MAIL_CONFIG": str(bed.postfix.dir)}
    up = cli(lm.config_path, "check", "--live", env=env, check=False)
    assert up.returncode == 0, up.stderr
    out = up.stdout
    assert f"live: milter inet:{lm.milter_port}@127.0.0.1: answers (milter protocol 6" in out
    assert f"live: serve: listmilter {__import__('listmilter').__version__}, pid {lm.proc.pid}, " \
           f"config {lm.config_path}" in out
    assert f"live: socketmap inet:{lm.socketmap_port}@127.0.0.1: recipients " in out and " -> OK " in out
    assert f"live: outgoing smtp: 127.0.0.1:{bed.postfix.port}: EHLO answered 250 (mx.example.test)" in out
    assert re.search(rf"live: postfix: postmap -q \S+ socketmap:inet:127.0.0.1:{lm.socketmap_port}:recipients "
                     r"-> \S+@example.org\n", out), out
    assert "live:" not in up.stderr

    # The outgoing MTA gone (a config pointing elsewhere): one line, exit 1.
    other = tmp_path / "other.yaml"
    other.write_text(lm.config_path.read_text().replace(f"127.0.0.1:{bed.postfix.port}", "127.0.0.1:9"))
    proc = cli(other, "check", "--live", env=env, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("live:")]
    assert proc.returncode == 1
    assert any(line.startswith("live: outgoing smtp: 127.0.0.1:9: Connection refused: listmilter cannot send")
               for line in lines), lines
    assert any(line.startswith(f"live: serve runs config {lm.config_path}, not {other}") for line in lines), lines

    lm.stop()
    try:
        down = cli(lm.config_path, "check", "--live", env=env, check=False)
        # docs/postfix.md, "While listmilter is down": only list mail waits; a person's mail goes.
        assert bed.smtp("carol@example.net", ["person@example.net"],
                        message("while down", to="person@example.net")) == {}
        bed.sink.wait_for_recipients(1)
        assert bed.sink.recipients() == ["person@example.net"]
    finally:
        lm.start()
    assert down.returncode == 1
    lines = [line for line in down.stderr.splitlines() if line.startswith("live:")]
    expected = (f"live: milter inet:{lm.milter_port}@127.0.0.1: Connection refused: Postfix answers list mail 4xx; "
                "is `listmilter serve` running?",
                f"live: serve: no {lm.state_dir}/deliver.sock: no serve runs on state_dir {lm.state_dir}; is",
                f"live: socketmap inet:{lm.socketmap_port}@127.0.0.1: Connection refused: Postfix answers "
                "'451 4.3.0 Temporary lookup failure'",
                "live: postfix: postmap -q ")
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    assert re.match(rf"live: postfix: postmap -q \S+ socketmap:inet:127.0.0.1:{lm.socketmap_port}:recipients: "
                    r"postmap: fatal: .*Connection refused: Postfix cannot reach", lines[-1]), lines[-1]
    assert "Traceback" not in down.stderr
    # Up again: the same check passes once more.
    assert cli(lm.config_path, "check", "--live", env=env, check=False).returncode == 0
