"""Expansion benchmark: a post to a list of N members through a private Postfix
to a sink, listmilter (sqlite, yaml and postgresql stores) against a bare "floor" milter.

    .venv/bin/python bench/run_expansion.py [--sizes 1000,10000,100000]
        [--repeat 2] [--backends sqlite,yaml,postgresql]

postgresql: a private PostgreSQL server on this machine (tests/bed/postgres.py, fsync on).

For each store: one Postfix with two smtpd listeners, one with listmilter as
its milter and one with bench/floor_milter.py, sharing the queue manager,
smtp clients, main.cf (socketmap tables included) and one smtp-sink. Times
are from the final "." of DATA to the 250 reply, and to the last
`status=sent` line for the post's queue id in the Postfix log.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BIG_LIMITS,
    BenchPostfix,
    MaillogTail,
    SmtpSink,
    free_port,
    machine,
    median,
    members,
    post,
    rss,
    save,
    start_postgresql,
    store_config,
    wait_for_port,
    wait_queue_empty,
    write_members,
)

from tests.bed.listmilter import ListmilterServer, cli

HERE = Path(__file__).resolve().parent


def list_address(n: int) -> str:
    return f"bench{n}@example.org"


def start_floor(workdir: Path, files: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [sys.executable, str(HERE / "floor_milter.py"), "--socket", f"inet:{port}@127.0.0.1"]
    for address, path in files.items():
        args += ["--list", f"{address}={path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "floor.stderr", "ab"))
    wait_for_port(port, timeout=60)
    return proc, port


def stop_proc(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_backend(backend: str, sizes: list[int], repeat: int, sink: SmtpSink, workdir: Path,
                files: dict[int, Path], db=None) -> dict:
    out: dict = {"backend": backend, "setup": {}, "runs": [], "rss": {}}
    lm = ListmilterServer(workdir / f"listmilter-{backend}", backend,
                          extra={"store": store_config(backend, db)})
    floor = postfix = None
    try:
        t = time.perf_counter()
        if backend == "yaml":
            for n in sizes:
                lm.lists[list_address(n)] = {"posting": "open", "members": members(n)}
            lm.write_config()
        else:
            for n in sizes:
                cli(lm.config_path, "list", "create", list_address(n), "--posting", "open")
                cli(lm.config_path, "members", "import", list_address(n), str(files[n]))
        out["setup"]["lists_seconds"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        # ListmilterServer.start() waits 15 s for the port; a big yaml file may need more.
        lm.proc = subprocess.Popen([sys.executable, "-m", "listmilter", "-c", str(lm.config_path), "serve"],
                                   stdout=subprocess.DEVNULL, stderr=open(lm.dir / "serve.stderr", "ab"))
        wait_for_port(lm.milter_port, timeout=120)
        wait_for_port(lm.socketmap_port, timeout=120)
        out["setup"]["serve_start_seconds"] = round(time.perf_counter() - t, 2)
        out["rss"]["listmilter_idle"] = rss(lm.proc.pid)

        floor, floor_port = start_floor(workdir, {list_address(n): files[n] for n in sizes})
        out["rss"]["floor_idle"] = rss(floor.pid)

        postfix = BenchPostfix(
            milter=lm.milter_spec, sink_port=sink.port, config_path=lm.config_path,
            socketmap=lm.socketmap_spec, workdir=workdir / f"postfix-{backend}", main_cf=BIG_LIMITS,
            extra_listeners={"floor": f"inet:127.0.0.1:{floor_port}"})
        lm.outgoing_port = postfix.port
        lm.write_config()
        postfix.start()
        ports = {"listmilter": postfix.port, "floor": postfix.ports["floor"]}
        procs = {"listmilter": lm.proc, "floor": floor.pid and floor}

        # Warm-up: one small post through each milter (first connections, process start-up in Postfix).
        tail = MaillogTail(postfix.dir / "maillog")
        for who in ports:
            post(ports[who], list_address(sizes[0]), sizes[0], tail)
        wait_queue_empty(postfix)

        for n in sizes:
            for r in range(repeat):
                # Alternate which goes first, so drift does not favour one.
                order = ["listmilter", "floor"] if r % 2 == 0 else ["floor", "listmilter"]
                for who in order:
                    tail = MaillogTail(postfix.dir / "maillog")
                    res = post(ports[who], list_address(n), n, tail)
                    wait_queue_empty(postfix)
                    res.update({"milter": who, "members": n, "repeat": r,
                                "rss": rss(procs[who].pid)})
                    out["runs"].append(res)
                    print(f"  {backend:10} {who:10} n={n:<7} 250 after {res['to_250']:7.3f} s, "
                          f"last delivery after {res['to_last_delivery']:7.3f} s, "
                          f"RSS {res['rss']['VmRSS']} MiB (peak {res['rss']['VmHWM']})", flush=True)
                    time.sleep(1)
        out["rss"]["listmilter_end"] = rss(lm.proc.pid)
        out["rss"]["floor_end"] = rss(floor.pid)
    finally:
        for stop in ((postfix.stop if postfix else None), lm.stop, lambda: stop_proc(floor)):
            if stop:
                try:
                    stop()
                except Exception as e:   # keep stopping the others
                    print(f"warning: stopping: {e}", file=sys.stderr)
    return out


def summarize(results: list[dict], sizes: list[int]) -> list[dict]:
    rows = []
    for b in results:
        for n in sizes:
            row = {"backend": b["backend"], "members": n}
            for who in ("listmilter", "floor"):
                runs = [r for r in b["runs"] if r["milter"] == who and r["members"] == n]
                row[f"{who}_250"] = median([r["to_250"] for r in runs])
                row[f"{who}_last"] = median([r["to_last_delivery"] for r in runs])
                row[f"{who}_250_min"] = min(r["to_250"] for r in runs)
                row[f"{who}_last_min"] = min(r["to_last_delivery"] for r in runs)
                row[f"{who}_hwm"] = max(r["rss"]["VmHWM"] for r in runs)
            row["ratio_250"] = row["listmilter_250"] / row["floor_250"]
            row["ratio_last"] = row["listmilter_last"] / row["floor_last"]
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--backends", default="sqlite,yaml")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) for inspection")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    backends = args.backends.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-"))
    workdir.chmod(0o755)
    files = {n: write_members(workdir / f"members-{n}.txt", members(n)) for n in sizes}
    sink = SmtpSink().start()
    started = time.perf_counter()
    results = []
    pg = None
    try:
        if "postgresql" in backends:
            pg, db = start_postgresql(workdir)
        for backend in backends:
            print(f"{backend}:", flush=True)
            results.append(run_backend(backend, sizes, args.repeat, sink, workdir, files,
                                       db if backend == "postgresql" else None))
    finally:
        sink.stop()
        if pg:
            pg.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(results, sizes)

    print(f"\nmedian of {args.repeat} runs; seconds from the end of DATA "
          "(ratio = listmilter / floor in the same Postfix)")
    head = (f"{'store':10} {'members':>8} | {'250: lm':>8} {'floor':>7} {'ratio':>6} | "
            f"{'last: lm':>9} {'floor':>7} {'ratio':>6} | {'peak RSS MiB: lm':>16} {'floor':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:10} {r['members']:>8} | {r['listmilter_250']:8.3f} {r['floor_250']:7.3f} "
              f"{r['ratio_250']:6.2f} | {r['listmilter_last']:9.3f} {r['floor_last']:7.3f} "
              f"{r['ratio_last']:6.2f} | {r['listmilter_hwm']:16.1f} {r['floor_hwm']:6.1f}")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    path = save("expansion", {"machine": machine(), "args": vars(args), "summary": rows,
                              "backends": results, "workdir": str(workdir) if args.keep else None})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
