"""Expansion through the real Sendmail: listmilter against two baselines in the same run.

    .venv/bin/python bench/run_sendmail.py [--sizes 1000,10000,20000,50000] [--repeat 1]
        [--modes listmilter,floor,rcpt] [--accept-only] [--keep]
    .venv/bin/python bench/run_sendmail.py --sizes 100 --modes rcpt-floor,rcpt-floor-inet

One private Sendmail (tests/bed/sendmail.py: listmilter as INPUT_MAIL_FILTER,
its socketmap and mailer, as docs/sendmail.md says) with more listeners: one
whose only milter is bench/floor_milter.py (on a unix socket), one with no
milter at all, and (for rcpt-floor-inet) one whose only milter is a second
floor on a 127.0.0.1 port. Everything goes to Postfix's smtp-sink. For each
list size N:

- listmilter: a post to a list of N members (sqlite store);
- floor: the same post through the floor milter, which adds the same N
  recipients (NOTIFY+ORCPT) from a Python list;
- rcpt: no milter work at all; the client itself gives the N members as RCPTs
  (pipelined, with NOTIFY+ORCPT) on the listener without a milter;
- rcpt-floor, rcpt-floor-inet: the same RCPTs on the floor's listeners, where
  the milter is told each RCPT (and adds nothing): unix socket against TCP.

Times: "accept" from the final "." of DATA to the 250 (for rcpt: from MAIL to
the 250, as the RCPTs are where Sendmail does that work), and "delivered"
from the final "." until Sendmail's queue holds no qf file any more (smtp-sink
accepts everything, so that is the last delivery).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import SmtpSink, free_port, machine, members, message, save, write_members

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import wait_for_port, wait_until
from tests.bed.sendmail import Sendmail, run_dir

HERE = Path(__file__).resolve().parent


def list_address(n: int) -> str:
    return f"bench{n}@example.org"


class Session:
    """A minimal SMTP client on a raw socket, so RCPTs can be pipelined."""

    def __init__(self, port: int, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        self.reply()                                   # greeting
        self.cmd("EHLO client.example.net")

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode(errors="replace").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, text: str) -> tuple[int, str]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def pipelined(self, commands: list[str]) -> list[tuple[int, str]]:
        """Send every command while a thread reads the replies (neither side blocks the other)."""
        replies: list[tuple[int, str]] = []
        reader = threading.Thread(target=lambda: replies.extend(self.reply() for _ in commands))
        reader.start()
        self.sock.sendall("".join(c + "\r\n" for c in commands).encode())
        reader.join()
        return replies

    def data_end(self, content: bytes) -> tuple[float, int, str]:
        data = re.sub(rb"(?m)^\.", b"..", content) + b"\r\n.\r\n"
        t0 = time.perf_counter()
        self.sock.sendall(data)
        code, text = self.reply()
        return t0, code, text

    def close(self) -> None:
        try:
            self.cmd("QUIT")
        except OSError:
            pass
        self.sock.close()


def queue_files(sendmail: Sendmail) -> int:
    return sum(1 for p in (sendmail.dir / "queue").iterdir() if p.name.startswith("qf"))


def wait_delivered(sendmail: Sendmail, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while queue_files(sendmail):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Sendmail queue not empty after {timeout}s:\n{sendmail.queue()[:2000]}")
        time.sleep(0.05)
    return time.perf_counter()


def drop_queue(sendmail: Sendmail) -> None:
    for p in (sendmail.dir / "queue").iterdir():
        p.unlink()


def post(port: int, sendmail: Sendmail, n: int, mode: str, timeout: float) -> dict:
    lst = list_address(n)
    content = message(lst, n)
    s = Session(port, timeout)
    try:
        if mode.startswith("rcpt"):
            bounces = lst.replace("@", "-bounces@")
            t_mail = time.perf_counter()
            cmds = [f"MAIL FROM:<{bounces}> RET=HDRS ENVID=rcpt.{n}"]
            cmds += [f"RCPT TO:<{m}> NOTIFY=FAILURE ORCPT=rfc822;{m}" for m in members(n)]
            cmds.append("DATA")
            replies = self_check(s.pipelined(cmds), n)
            t0, code, text = s.data_end(content)
            start = t_mail
        else:
            for c, expect in (("MAIL FROM:<alice@example.net>", 250), (f"RCPT TO:<{lst}>", 250),
                              ("DATA", 354)):
                code, text = s.cmd(c)
                if code != expect:
                    raise RuntimeError(f"{c}: {code} {text}")
            t0, code, text = s.data_end(content)
            start = t0
            replies = None
        t_250 = time.perf_counter()
    finally:
        s.close()
    if code != 250:
        raise RuntimeError(f"{mode} n={n}: end of data answered {code} {text}")
    if sendmail.queue_only:
        drop_queue(sendmail)
        t_done = float("nan")
    else:
        t_done = wait_delivered(sendmail, timeout)
    del replies
    return {"mode": mode, "members": n, "accept": t_250 - start, "delivered": t_done - t0,
            "queue_id": text.split()[2] if len(text.split()) > 2 else ""}


def self_check(replies: list[tuple[int, str]], n: int) -> list:
    bad = [r for r in replies[:-1] if r[0] != 250]
    if bad or replies[-1][0] != 354:
        raise RuntimeError(f"pipelined MAIL/RCPT/DATA: {len(bad)} refused, first {bad[:1]}, DATA {replies[-1]}")
    return replies


def stop_proc(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,20000,50000")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--modes", default="listmilter,floor,rcpt")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per post (also Sendmail's T=E)")
    p.add_argument("--accept-only", action="store_true",
                   help="queue only: time to the 250, then drop the queued post (no delivery)")
    p.add_argument("--keep", action="store_true", help="keep the work folders (logs) for inspection")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = args.modes.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-sendmail-"))
    workdir.chmod(0o755)
    files = {n: write_members(workdir / f"members-{n}.txt", members(n)) for n in sizes}
    sink = SmtpSink().start()
    sendmail_dir = run_dir()
    lm = ListmilterServer(workdir / "listmilter", "sqlite", milter_path=sendmail_dir / "listmilter.sock")
    floors: list[subprocess.Popen] = []
    sendmail = None
    runs: list[dict] = []
    started = time.perf_counter()
    try:
        for n in sizes:
            cli(lm.config_path, "list", "create", list_address(n), "--posting", "open")
            cli(lm.config_path, "members", "import", list_address(n), str(files[n]))

        def start_floor(spec: str) -> None:
            argv = [sys.executable, str(HERE / "floor_milter.py"), "--socket", spec]
            for n in sizes:
                argv += ["--list", f"{list_address(n)}={files[n]}"]
            floors.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                           stderr=open(workdir / "floor.stderr", "ab")))
        floor_sock = sendmail_dir / "floor.sock"     # a unix socket, like listmilter's (docs/sendmail.md)
        start_floor(f"unix:{floor_sock}")
        wait_until(floor_sock.exists, 60, what="the floor milter's socket")
        listeners = {"floor": f"local:{floor_sock}", "plain": None}
        if "rcpt-floor-inet" in modes:
            inet_port = free_port()
            start_floor(f"inet:{inet_port}@127.0.0.1")
            wait_for_port(inet_port, timeout=60)
            listeners["floorinet"] = f"inet:{inet_port}@127.0.0.1"
        sendmail = Sendmail(workdir=sendmail_dir, milter=f"local:{lm.milter_path}", sink_port=sink.port,
                            config_path=lm.config_path, socketmap_port=lm.socketmap_port,
                            eom_timeout=f"{int(args.timeout)}s", extra_milters=listeners,
                            queue_only=args.accept_only)
        lm.outgoing_port = sendmail.port
        lm.write_config()
        lm.start()
        sendmail.socketmap_port = lm.socketmap_port
        sendmail.start()
        ports = {"listmilter": sendmail.port, "floor": sendmail.ports["floor"], "rcpt": sendmail.ports["plain"],
                 "rcpt-floor": sendmail.ports["floor"], "rcpt-floor-inet": sendmail.ports.get("floorinet")}

        for mode in modes:    # warm-up, not counted
            post(ports[mode], sendmail, sizes[0], mode, args.timeout)
        for n in sizes:
            for r in range(args.repeat):
                order = modes if r % 2 == 0 else modes[::-1]
                for mode in order:
                    res = post(ports[mode], sendmail, n, mode, args.timeout)
                    res["repeat"] = r
                    runs.append(res)
                    print(f"  {mode:10} n={n:<7} accepted after {res['accept']:8.3f} s, "
                          f"delivered after {res['delivered']:8.3f} s", flush=True)
                    time.sleep(1)
    finally:
        for stop in ((sendmail.stop if sendmail else None), lm.stop, *(lambda f=f: stop_proc(f) for f in floors),
                     sink.stop):
            if stop:
                try:
                    stop()
                except Exception as e:   # keep stopping the others
                    print(f"warning: stopping: {e}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(sendmail_dir, ignore_errors=True)

    def med(n, mode, key):
        xs = sorted(r[key] for r in runs if r["members"] == n and r["mode"] == mode)
        return xs[len(xs) // 2] if xs else float("nan")

    print(f"\nSendmail, median of {args.repeat}; seconds (accept: end of DATA to 250, for rcpt MAIL to 250; "
          "delivered: end of DATA to an empty queue)")
    head = f"{'members':>8} | " + " | ".join(f"{m + ' accept':>17} {'delivered':>9}" for m in modes)
    print(head)
    print("-" * len(head))
    rows = []
    for n in sizes:
        row = {"members": n}
        cells = []
        for m in modes:
            row[f"{m}_accept"], row[f"{m}_delivered"] = med(n, m, "accept"), med(n, m, "delivered")
            cells.append(f"{row[f'{m}_accept']:17.3f} {row[f'{m}_delivered']:9.3f}")
        rows.append(row)
        print(f"{n:>8} | " + " | ".join(cells))
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    path = save("sendmail", {"machine": machine(), "args": vars(args), "summary": rows, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
