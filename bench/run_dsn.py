"""DSNs per second through the real pipe transport, against two floors in the same Postfix.

N DSNs, one per member, each to the member's own VERP address
<list>-bounces+CODE@ (the sender of a personal copy: the code binds member and
post, so each DSN is scored), are submitted over SMTP; Postfix runs `listmilter
deliver` once per DSN, as user nobody, exactly as in the tests. The clock runs from the
first MAIL to the N-th `deliver:` line (in serve's log when deliver handed
the DSN to serve, in the pipe's log when it worked alone).

Rows:
  - floor-sh:      /bin/cat > /dev/null  (Postfix's own pipe cost)
  - floor-python:  /usr/bin/python3 -c 'read stdin'  (plus a Python start-up)
  - listmilter deliver:          handed to the running serve (the normal case)
  - listmilter deliver (alone):  serve's socket removed, so every deliver
                                 loads the config and the core itself

The list's addresses reach the pipe as docs/postfix.md routes them: local(8)
hands them to fallback_transport. --direct routes the bounce address straight
to the pipe with a transport_maps entry instead (the routing before
fallback_transport), to measure what the local(8) step costs.


In the same run, the CPU behind those rows: serve's own CPU time per DSN it
took over (from /proc/PID/stat across the handed-off run), and the CPU of one
process of each pipe command run directly as the pipe user on one DSN
(resource usage of waited-for children): a bare Python start-up,
`listmilter deliver` handing off to serve, `listmilter deliver` working alone.
And one DSN to the plain <list>-bounces@ naming 1,000 members (as Postfix writes
one for an in-place post that failed for 1,000 of them) against one naming a
single member: nothing there binds a failure to its member, so each named member
is sent a probe (core/probes.py), all in one SMTP session. Time from the SMTP
submission to serve's `deliver:` line (the probes are in Postfix's queue then),
and to the sink's receipt of the last probe.

    .venv/bin/python bench/run_dsn.py [--dsns 1000] [--repeat 2] [--backend sqlite|postgresql] [--direct]
        [--cpu-runs 50] [--storm 1000]

--backend postgresql: the state in a private PostgreSQL server here (fsync on).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, save, start_postgresql, store_config  # common puts the repo on sys.path

from listmilter.core import config as config_mod  # noqa: E402
from listmilter.core import envid, verp  # noqa: E402
from listmilter.mta import handoff  # noqa: E402
from listmilter.store import site_secret  # noqa: E402
from tests.bed.listmilter import ListmilterServer  # noqa: E402
from tests.bed.net import wait_until  # noqa: E402
from tests.bed.postfix import PIPE_USER, Postfix, pipe_runtime  # noqa: E402
from tests.bed.sink import Sink  # noqa: E402
from tests.conftest import dsn_message  # noqa: E402

LIST = "bench@example.org"
FLOORS = {
    # master.cf groups an argument with { } (Postfix >= 3.0), not with quotes.
    "floor-sh": "/bin/sh -c { cat >/dev/null }",
    "floor-python": "/usr/bin/python3 -c { import sys; sys.stdin.buffer.read() }",
}
DELIVER_ROWS = ("listmilter deliver", "listmilter deliver (alone)")


class BenchPostfix(Postfix):
    """The test bed's Postfix plus two do-nothing pipe transports on their own domains."""

    direct: str | None = None        # an address routed to the listmilter pipe by transport_maps

    def _main_cf(self) -> dict[str, str]:
        cf = super()._main_cf()
        domains = " ".join(f"{name}.example" for name in FLOORS)
        cf["mydestination"] += " " + domains
        inline = ", ".join(f"{name}@{name}.example={name}:" for name in FLOORS)
        cf["local_recipient_maps"] = f"inline:{{{inline}}} " + cf["local_recipient_maps"]
        if self.direct:
            inline += f", {self.direct}=listmilter:"
        cf["transport_maps"] = f"inline:{{{inline}}}"   # the floors; lists go by fallback_transport
        for name in FLOORS:
            cf[f"{name}_destination_recipient_limit"] = "1"
        return cf

    def _write_config(self) -> None:
        super()._write_config()
        for name, command in FLOORS.items():
            self.postconf("-Me", f"{name}/unix = {name} unix - n n - - pipe flags=q user={PIPE_USER} "
                                 f"argv={command}")


def dsn(to: str, member: str, env: str) -> bytes:
    return dsn_message(env, f"""
        Original-Recipient: rfc822;{member}
        Final-Recipient: rfc822; {member}
        Action: failed
        Status: 5.1.1
        Diagnostic-Code: smtp; 550 5.1.1 no such user
        """, to=to)


def serve_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_cpu(argv: list[str], data: bytes, runs: int) -> float:
    """CPU seconds per run of argv (as the pipe user, message on stdin), children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        proc = subprocess.run(["runuser", "-u", PIPE_USER, "--", *argv], input=data, capture_output=True,
                              timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / runs


def run_once(postfix: Postfix, messages: list[tuple[str, bytes]], count_lines) -> float:
    """Seconds from the first MAIL until count_lines() has grown by one per (recipient, message)."""
    before = count_lines()
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=120) as smtp:
        for to, m in messages:
            smtp.sendmail("", [to], m)
    wait_until(lambda: count_lines() - before >= len(messages), 600, interval=0.1,
               what=f"{len(messages)} pipe deliveries")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsns", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cpu-runs", type=int, default=50, help="processes per row of the CPU table")
    ap.add_argument("--storm", type=int, default=1000, help="members named by the one big DSN")
    ap.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--direct", action="store_true",
                    help="route the bounce address by transport_maps, not through local(8)")
    args = ap.parse_args()
    n = args.dsns
    work = Path(tempfile.mkdtemp(prefix="bench-dsn-"))
    work.chmod(0o755)
    pg, db = start_postgresql(work) if args.backend == "postgresql" else (None, None)
    sink = Sink().start()
    lm = ListmilterServer(work / "listmilter", args.backend, extra={"store": store_config(args.backend, db)})
    postfix = BenchPostfix(milter=lm.milter_spec, sink_port=sink.port, config_path=lm.config_path,
                           socketmap=lm.socketmap_spec, workdir=work / "postfix",
                           main_cf={"default_process_limit": "100"})
    if args.direct:
        postfix.direct = LIST.replace("@", "-bounces@")
    lm.outgoing_port = postfix.port
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    storms: dict[str, float] = {}
    try:
        lm.write_config()
        lm.start()
        postfix.start()
        members = [f"m{i:06d}@example.net" for i in range(n * args.repeat * len(DELIVER_ROWS))]
        storm = [f"s{i:06d}@example.net" for i in range(args.storm + 1)]
        cpu_members = [f"c{i:06d}@example.net" for i in range(args.cpu_runs * 2)]
        members += storm + cpu_members
        # The DSNs come over SMTP, as another host's would; they stand for this host's own (Postfix's
        # bounce daemon), whose probes bounce_probes_per_day does not limit.
        lm.create_list(LIST, members, posting="open", bounce_action="notify", bounce_threshold=1000,
                       bounce_probes_per_day=0)
        secret = site_secret(config_mod.load(str(lm.config_path)))
        bounces_addr = LIST.replace("@", "-bounces@")
        bounces_prefix = LIST.partition("@")[0] + "-bounces"        # plain, or +CODE (VERP)

        def deliver_log() -> list[str]:
            return (lm.log() + postfix.pipe_log.read_text()).splitlines()

        def deliver_lines() -> int:
            return sum(1 for line in deliver_log() if f"to=<{bounces_prefix}" in line and "role=bounces" in line)

        def bound_dsn(member: str, post_id: str) -> tuple[str, bytes]:
            """A DSN of `member`'s personal copy of post `post_id`, to that copy's VERP sender."""
            posted = time.time()
            to = verp.make(LIST, member, post_id, posted, secret)
            assert to is not None
            return to, dsn(to, member, envid.make(post_id, LIST, secret, posted))

        def floor_lines() -> int:
            return sum(1 for line in postfix.log().splitlines()
                       if "relay=floor-" in line and "status=sent" in line)

        for r in range(args.repeat):
            for name in FLOORS:
                to = f"{name}@{name}.example"
                msgs = [(to, dsn(to, members[i], "x")) for i in range(n)]
                results.setdefault(name, []).append(run_once(postfix, msgs, floor_lines))
            for k, name in enumerate(DELIVER_ROWS):
                chunk = members[(2 * r + k) * n:(2 * r + k + 1) * n]
                msgs = [bound_dsn(m, f"B{r}x{k}x{i}") for i, m in enumerate(chunk)]
                sock = lm.state_dir / handoff.SOCKET_NAME
                if name.endswith("(alone)"):
                    sock.rename(sock.with_name("deliver.sock.off"))
                cpu_before = serve_cpu(lm.proc.pid)
                try:
                    results.setdefault(name, []).append(run_once(postfix, msgs, deliver_lines))
                finally:
                    if name.endswith("(alone)"):
                        sock.with_name("deliver.sock.off").rename(sock)
                if not name.endswith("(alone)"):
                    cpu.setdefault("serve, per DSN handed to it", []).append(
                        (serve_cpu(lm.proc.pid) - cpu_before) / n)

        scored = sum(1 for line in deliver_log() if " scored" in line)
        alone = sum(1 for line in postfix.pipe_log.read_text().splitlines() if " scored" in line)

        # One process of each pipe command, run directly as the pipe user on one DSN each.
        runtime = pipe_runtime()
        env = ["/usr/bin/env", f"PYTHONPATH={runtime}", f"LISTMILTER_LOG={work / 'cpu.log'}"]
        (work / "cpu.log").touch()
        shutil.chown(work / "cpu.log", PIPE_USER)
        cpu_to, sample = bound_dsn(cpu_members[0], "CPU0")
        deliver = [*env, f"{runtime}/bin/listmilter", "-c", str(lm.config_path), "deliver", cpu_to, ""]
        cpu["python3 start-up (floor-python)"] = [
            child_cpu(["/usr/bin/python3", "-c", "import sys; sys.stdin.buffer.read()"], sample, args.cpu_runs)]
        cpu["deliver, handing off to serve"] = [child_cpu(deliver, sample, args.cpu_runs)]
        sock = lm.state_dir / handoff.SOCKET_NAME
        sock.rename(sock.with_name("deliver.sock.off"))
        try:
            cpu["deliver, working alone"] = [child_cpu(deliver, sample, args.cpu_runs)]
        finally:
            sock.with_name("deliver.sock.off").rename(sock)

        # One DSN naming many members against one naming a single member, through Postfix: each
        # named member is sent a probe, all in one SMTP session, before serve logs the DSN.
        def probes_at_sink() -> int:
            return sum(1 for m in sink.messages if m.mail_from.startswith(bounces_prefix + "+probe-"))

        for label, named in ((f"one DSN naming {args.storm} members", storm[:args.storm]),
                             ("one DSN naming 1 member", storm[args.storm:])):
            env_id = envid.make(f"STORM{len(named)}", LIST, secret, time.time())
            blocks = [f"""
                Original-Recipient: rfc822;{m}
                Final-Recipient: rfc822; {m}
                Action: failed
                Status: 5.1.1
                """ for m in named]
            before = probes_at_sink()
            start = time.monotonic()
            storms[label] = run_once(postfix, [(bounces_addr, dsn_message(env_id, *blocks, to=bounces_addr))],
                                     deliver_lines)
            wait_until(lambda named=named, before=before: probes_at_sink() - before >= len(named), 600, interval=0.1,
                       what="every probe at the sink")
            storms[f"{label}, to the last probe at the sink"] = time.monotonic() - start
        if not any(line.count(" suspect (probe sent)") == args.storm for line in deliver_log()):
            raise RuntimeError(f"the DSN naming {args.storm} members did not probe them all")
    finally:
        postfix.stop()
        lm.stop()
        sink.stop()
        if pg:
            pg.stop()

    total = n * args.repeat * len(DELIVER_ROWS)
    print(f"{args.backend}: {n} DSNs per run, {args.repeat} runs; {scored} scored of {total}, "
          f"{alone} of them without serve")
    print(f"{'pipe command':<28} {'best s':>8} {'DSNs/s':>8}")
    out = {}
    for name, times in results.items():
        best = min(times)
        out[name] = {"times": times, "per_second": n / best}
        print(f"{name:<28} {best:>8.2f} {n / best:>8.0f}   (runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"\nCPU per process (mean of {args.cpu_runs} runs each) and serve's own per DSN (median of runs):")
    for name, values in cpu.items():
        values = sorted(values)
        print(f"  {name:<34} {values[len(values) // 2] * 1000:7.1f} ms")
    print("\nfrom submission to serve's deliver: line (and to the last probe at the sink):")
    for name, seconds in storms.items():
        print(f"  {name:<60} {seconds:7.2f} s")
    path = save(f"dsn-{args.backend}" if args.backend != "sqlite" else "dsn",
                {"machine": machine(), "args": vars(args), "results": out, "cpu": cpu, "storm": storms})
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    if scored != total or alone != n * args.repeat:
        print("error: not every DSN was scored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
