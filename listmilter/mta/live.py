"""`listmilter check --live`: is the path a post takes up, right now?

Each probe talks to the real thing: the milter socket (a libmilter option
negotiation), serve itself (its version and config, over the hand-off
socket), the socketmap table (a lookup), the MTA at `outgoing` (EHLO), and
Postfix's own `postmap -q` against the socketmap table as main.cf names it.
Each failure is one line saying what to do.
"""

from __future__ import annotations

import os
import smtplib
import socket
import struct
import subprocess

from listmilter import __version__
from listmilter.mta import handoff, netstring
from listmilter.mta import postfix_check as mta
from listmilter.mta.socketmap import parse_socket

TIMEOUT = 5.0
DOWN = "is `listmilter serve` running? (systemctl start listmilter, or docs/install.md without systemd; " \
       "its log says why it stopped)"


def _connect(spec: str) -> socket.socket:
    family, where = parse_socket(spec)
    address: str | tuple[str, int]
    if family == "unix":
        assert isinstance(where, str)
        address = where
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        assert isinstance(where, tuple)
        host, port = where
        address = ("127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host, port)
        sock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def milter(spec: str) -> str:
    """Negotiate as an MTA does (SMFIC_OPTNEG, milter protocol 6); what the milter offered."""
    with _connect(spec) as sock:
        body = b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF)
        sock.sendall(struct.pack("!I", len(body)) + body)
        length = struct.unpack("!I", _read(sock, 4))[0]
        reply = _read(sock, min(length, 4096))
        if reply[:1] != b"O" or len(reply) < 13:
            raise ConnectionError(f"not a milter negotiation reply: {reply[:20]!r}")
        sock.sendall(struct.pack("!I", 1) + b"Q")
        version, actions, _ = struct.unpack("!III", reply[1:13])
        return f"milter protocol {version}, actions 0x{actions:x}"


def socketmap(spec: str, request: str) -> str:
    with _connect(spec) as sock:
        sock.sendall(netstring.encode(request.encode()))
        reply = netstring.read(sock.makefile("rb"), 10000)
    if reply is None:
        raise ConnectionError("connection closed without an answer")
    return reply.decode("utf-8", "replace")


def outgoing_ehlo(outgoing) -> str:
    with smtplib.SMTP(outgoing.smtp_host, outgoing.smtp_port, local_hostname="localhost",
                      timeout=TIMEOUT) as smtp:
        code, text = smtp.ehlo()
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)
        return text.decode("utf-8", "replace").splitlines()[0]


def _recipients_table(pf: mta.Postfix, cfg, queue_dir: str) -> str:
    """The socketmap recipients table as main.cf names it (else as it should)."""
    table = mta._listmilter_socket(cfg.socketmap_socket)
    for param in mta.RECIPIENT_MAPS:
        for spec in mta._tables(pf.param(param), "recipients"):
            if table in mta._postfix_socket(spec, queue_dir):
                return f"socketmap:{spec}:recipients"
    return f"socketmap:{mta.postfix_form(cfg.socketmap_socket, queue_dir)}:recipients"


def postmap(pf: mta.Postfix, cfg, address: str) -> tuple[int, str, str, str]:
    """`postmap -q ADDRESS TABLE` run as Postfix's daemons would, from its queue directory
    (where a relative unix: name points); (exit code, output, its last complaint, the table)."""
    queue_dir = pf.param("queue_directory") or "/var/spool/postfix"
    table = _recipients_table(pf, cfg, queue_dir)
    args = ["postmap"]
    if os.environ.get("MAIL_CONFIG"):
        args += ["-c", os.environ["MAIL_CONFIG"]]
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    try:
        proc = subprocess.run([*args, "-q", address, table], capture_output=True, text=True,
                              timeout=30, cwd=queue_dir, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, "", str(e), table
    complaints = proc.stderr.strip().splitlines()
    return proc.returncode, proc.stdout.strip(), complaints[-1] if complaints else "", table


def run(cfg, store_lists: list[str], report) -> None:
    """Probe every part of the path; notes for what answers, errors (one line each) for what does not."""
    try:
        report.notes.append(f"live: milter {cfg.milter_socket}: answers ({milter(cfg.milter_socket)})")
    except (OSError, ValueError) as e:
        report.errors.append(f"live: milter {cfg.milter_socket}: {_why(e)}: Postfix answers mail 4xx; {DOWN}")

    try:
        version, config, pid = handoff.status(cfg.state_dir)
    except FileNotFoundError:
        report.errors.append(f"live: serve: no {os.path.join(cfg.state_dir, handoff.SOCKET_NAME)}: "
                             f"no serve runs on state_dir {cfg.state_dir}; {DOWN}")
    except (OSError, netstring.Malformed) as e:
        report.errors.append(f"live: serve: cannot ask it for its version on "
                             f"{os.path.join(cfg.state_dir, handoff.SOCKET_NAME)} ({_why(e)}): run check as "
                             "root or as the service user; a serve older than this listmilter cannot answer: "
                             "restart it")
    else:
        report.notes.append(f"live: serve: listmilter {version}, pid {pid}, config {config or 'built-in defaults'}")
        if version != __version__:
            report.errors.append(f"live: serve runs listmilter {version}, this is {__version__}: restart it "
                                 "(systemctl restart listmilter) to run the installed version")
        mine = os.path.realpath(cfg.path) if cfg.path else ""
        if config != mine:
            report.errors.append(f"live: serve runs config {config or 'built-in defaults'}, not "
                                 f"{mine or 'built-in defaults'} checked here: give serve the same -c (or "
                                 "$LISTMILTER_CONFIG), or check that one with -c")

    probe = store_lists[0] if store_lists else "listmilter-check-probe@invalid"
    try:
        answer = socketmap(cfg.socketmap_socket, f"recipients {probe}")
    except (OSError, ValueError, netstring.Malformed) as e:
        report.errors.append(f"live: socketmap {cfg.socketmap_socket}: {_why(e)}: Postfix answers "
                             f"'451 4.3.0 Temporary lookup failure' for list addresses; {DOWN}")
    else:
        expected = "OK" if store_lists else "NOTFOUND"
        if answer.split(" ", 1)[0] == expected:
            report.notes.append(f"live: socketmap {cfg.socketmap_socket}: recipients {probe} -> {answer.strip()}")
        else:
            report.errors.append(f"live: socketmap {cfg.socketmap_socket}: recipients {probe} -> {answer}: "
                                 "expected " + expected + "; see the TEMP lines in listmilter's log")

    if cfg.outgoing.sendmail:
        if os.access(cfg.outgoing.sendmail, os.X_OK):
            report.notes.append(f"live: outgoing sendmail {cfg.outgoing.sendmail}: executable")
        else:
            report.errors.append(f"live: outgoing sendmail {cfg.outgoing.sendmail}: not an executable file: "
                                 "set outgoing.sendmail to the MTA's sendmail command")
    else:
        try:
            greeting = outgoing_ehlo(cfg.outgoing)
        except (OSError, smtplib.SMTPException) as e:
            report.errors.append(f"live: outgoing {cfg.outgoing.describe()}: {_why(e)}: listmilter cannot send "
                                 "split-off copies, personal copies or notices (posts to several lists get "
                                 "4xx); start the MTA there, or set outgoing.smtp to where it listens")
        else:
            report.notes.append(f"live: outgoing {cfg.outgoing.describe()}: EHLO answered 250 ({greeting})")

    pf = mta.Postfix.ask()
    if pf is None or pf.error:
        report.notes.append("live: postfix: no Postfix to ask (postconf); postmap lookup skipped")
        return
    code, out, complaint, table = postmap(pf, cfg, probe)
    # postmap -q: exit 0 found, 1 not found, and 1 with a complaint when the lookup failed.
    if complaint:
        report.errors.append(f"live: postfix: postmap -q {probe} {table}: {complaint}: Postfix cannot reach "
                             f"listmilter's socketmap the way main.cf names it; {DOWN}")
    elif (code == 0 and out.lower() == probe.lower()) if store_lists else code == 1:
        report.notes.append(f"live: postfix: postmap -q {probe} {table} -> {out or 'not found, as it should'}")
    else:
        report.errors.append(f"live: postfix: postmap -q {probe} {table} -> {out or 'not found'} (exit {code}): "
                             "Postfix does not resolve this list address through listmilter's socketmap; "
                             "plain `listmilter check` names the main.cf line to fix")


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or e.__class__.__name__
