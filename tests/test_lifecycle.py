"""Running in production: unix sockets in Postfix's queue folder, reload by
SIGUSR1 (`systemctl reload`) and stop by SIGTERM without losing mail."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess

import pytest

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import message


def _open_session(bed, sender: str, rcpt: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=60)
    s.ehlo("client.example.net")
    assert s.mail(sender)[0] == 250
    assert s.rcpt(rcpt)[0] == 250
    return s


def _wait_log(bed, text: str, start: int = 0) -> str:
    return wait_until(lambda: text in bed.listmilter.log()[start:] and bed.listmilter.log(), 15,
                      what=f"{text!r} in the listmilter log")


def _rewrite_keeping_mtime(path, text: str) -> None:
    """A config edit the 1 s mtime poll cannot see: only SIGUSR1 makes it count."""
    st = os.stat(path)
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("own_bed", [{"unix_sockets": True}], indirect=True)
def test_postfix_talks_to_milter_and_socketmap_over_unix_sockets_in_its_queue_folder(own_bed):
    bed = own_bed
    sock = bed.listmilter.socket_dir / "milter.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o770, oct(st.st_mode)
    assert st.st_gid == __import__("grp").getgrnam("postfix").gr_gid
    assert "unix:listmilter/milter.sock" in bed.postfix.postconf("-h", "smtpd_milters")
    lst = bed.new_list(["u1@example.net", "u2@example.net"], posting="open")
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    assert sorted(bed.sink.recipients()) == ["u1@example.net", "u2@example.net"]
    # The socketmap answered for the list (it was accepted) and routes role addresses.
    bed.smtp("carol@example.net", [lst.replace("@", "-request@")], message(to=lst, sender="carol@example.net"))
    wait_until(lambda: "status=sent" in bed.postfix.log() and "delivered via listmilter" in bed.postfix.log(),
               30, what="the -request@ mail to reach the pipe transport")
    # check resolves Postfix's relative unix:listmilter/... names against its queue folder.
    report = cli(bed.listmilter.config_path, "check", env={"MAIL_CONFIG": str(bed.postfix.dir)}, check=False)
    assert report.returncode == 0 and "postfix" not in report.stderr, report.stderr
    proc = bed.listmilter.proc
    bed.listmilter.stop()
    assert proc.returncode == 0
    assert not sock.exists() and not (bed.listmilter.socket_dir / "socketmap.sock").exists()


@pytest.mark.parametrize("own_bed", ["yaml"], indirect=True)
def test_sigusr1_reloads_now_keeps_open_sessions_and_survives_a_bad_config(own_bed):
    bed = own_bed
    lm = bed.listmilter
    lst = bed.new_list(["r1@example.net"], posting="open")
    good = lm.config_path.read_text()

    session = _open_session(bed, "carol@example.net", lst)
    # A broken config: logged with file and line, the old one keeps working.
    mark = len(lm.log())
    _rewrite_keeping_mtime(lm.config_path, good + "defaults:\n  posting: whoever\n")
    lm.proc.send_signal(signal.SIGUSR1)
    log = _wait_log(bed, "config reload failed, still running on the last good config", mark)
    assert f"{lm.config_path}:{len(good.splitlines()) + 2}: defaults.posting" in log
    assert session.data(message("across a failed reload", "carol@example.net", lst))[0] == 250
    bed.sink.wait_for_recipients(1)

    # A good config takes effect at once, with a session open across the reload.
    session.mail("carol@example.net")
    session.rcpt(lst)
    mark = len(lm.log())
    _rewrite_keeping_mtime(lm.config_path, good + "defaults:\n  subject_prefix: '[new] '\n")
    lm.proc.send_signal(signal.SIGUSR1)
    _wait_log(bed, "config reloaded from", mark)
    assert session.data(message("across a good reload", "carol@example.net", lst))[0] == 250
    # A message keeps the config it started with; the next one has the new one.
    session.sendmail("carol@example.net", [lst], message("after the reload", "carol@example.net", lst))
    session.quit()
    bed.sink.wait_for_recipients(3)
    subjects = sorted(m.message["Subject"] for m in bed.sink.messages)
    assert subjects == ["[new] after the reload", "across a failed reload", "across a good reload"]
    assert lm.proc.poll() is None
    assert "Traceback" not in lm.log()


@pytest.mark.parametrize("own_bed", ["sqlite"], indirect=True)
def test_sigterm_mid_data_finishes_the_message_then_stops(own_bed):
    bed = own_bed
    lst = bed.new_list(["t1@example.net", "t2@example.net"], posting="open")
    s = _open_session(bed, "carol@example.net", lst)
    s.putcmd("data")
    assert s.getreply()[0] == 354
    text = message("stopped mid-DATA", "carol@example.net", lst)
    s.send(text[: len(text) // 2])
    proc = bed.listmilter.proc
    proc.send_signal(signal.SIGTERM)
    # New messages get 4xx while the open one finishes.
    _wait_log(bed, "stopping: new messages get 4xx")
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert info.value.smtp_code == 451 and b"shutting down" in info.value.smtp_error, info.value
    assert proc.poll() is None, "listmilter exited with a message in flight"
    s.send(text[len(text) // 2:] + b"\r\n.\r\n")
    code, reply = s.getreply()
    s.quit()
    proc.wait(timeout=30)
    assert proc.returncode == 0
    log = bed.listmilter.log()
    assert "waiting up to 30s for 1 messages in flight" in log and "unfinished" not in log
    # 4xx would be safe too (the client retries), but the message was in
    # flight and the client kept going: it must have been finished.
    assert code == 250, (code, reply)
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert sorted(bed.sink.recipients()) == ["t1@example.net", "t2@example.net"]
    # The socketmap stopped with it.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", bed.listmilter.socketmap_port), timeout=2).close()


def test_message_still_unfinished_after_the_grace_is_taken_then_expanded_once_after_restart(own_bed):
    bed = own_bed
    bed.listmilter.env["LISTMILTER_STOP_GRACE"] = "2"
    bed.listmilter.stop()
    bed.listmilter.start()
    lst = bed.new_list(["g1@example.net"], posting="open")
    s = _open_session(bed, "carol@example.net", lst)
    s.putcmd("data")
    assert s.getreply()[0] == 354
    text = message("slow client", "carol@example.net", lst)
    s.send(text[:40])
    proc = bed.listmilter.proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0
    assert "warning: stopping with 1 messages unfinished" in bed.listmilter.log()
    s.send(text[40:] + b"\r\n.\r\n")
    code, reply = s.getreply()
    s.close()
    # milter_default_action = accept: Postfix takes it without the milter; the pipe
    # transport keeps it queued (never delivered unexpanded) until serve runs again.
    assert code == 250, (code, reply)
    wait_until(lambda: "listmilter serve is not running" in bed.postfix.log(), 30,
               what="the pipe transport to defer the unexpanded post")
    assert bed.sink.deliveries() == []
    bed.listmilter.start()
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True)
    bed.sink.wait_for_recipients(1)
    bed.settle()
    assert [(r, m.message["Message-ID"]) for r, m in bed.sink.deliveries()] == \
        [("g1@example.net", email_id(text))]


def email_id(text: bytes) -> str:
    return next(line.split(b":", 1)[1].strip().decode() for line in text.splitlines()
                if line.lower().startswith(b"message-id:"))


@pytest.mark.mta
def test_serve_exits_0_on_sigterm_and_sighup_is_not_a_crash(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\nmilter: {{socket: 'unix:{tmp_path}/m.sock'}}\n"
                   f"socketmap: {{socket: 'unix:{tmp_path}/s.sock'}}\nlog: {{target: {tmp_path}/log}}\n")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = subprocess.Popen([os.sys.executable, "-m", "listmilter", "-c", str(cfg), "serve"],
                                stderr=subprocess.PIPE)
        try:
            wait_until(lambda: (tmp_path / "m.sock").exists() and (tmp_path / "s.sock").exists(), 15,
                       what="the sockets")
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        assert not (tmp_path / "s.sock").exists()
