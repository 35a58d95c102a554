"""Member import benchmark: 100,000 members into a fresh sqlite store, the way an
admin does it (whole CLI commands, Python start-up included), and how long the
yaml store takes to load a config file holding them.

    /work/main/.venv/bin/python bench/run_import.py [--members 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import machine, median, members, save, write_members

from listmilter.core import config as config_mod
from listmilter.store import open_store


def timed(args: list[str], input: str | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(args, input=input, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return elapsed


def write_config(folder: Path, backend: str = "sqlite", lists: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(folder / "state"), "store": {"backend": backend},
           "log": {"target": str(folder / "listmilter.log")}}
    if lists:
        cfg["lists"] = lists
    path = folder / "listmilter.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    n = args.members
    lm = [sys.executable, "-m", "listmilter"]
    work = Path(tempfile.mkdtemp(prefix="lmimport-"))
    results: dict = {"machine": machine(), "members": n, "repeat": args.repeat, "seconds": {}}
    secs = results["seconds"]
    try:
        addrs = members(n)
        file = write_members(work / "members.txt", addrs)
        stdin_text = file.read_text()

        secs["python_startup"] = [timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat)]
        secs["listmilter_version"] = [timed(lm + ["--version"]) for _ in range(args.repeat)]
        for key in ("members_import_fresh", "members_add_stdin_fresh", "members_import_again"):
            secs[key] = []
        for r in range(args.repeat):
            cfg = write_config(work / f"sqlite-{r}")
            timed(lm + ["-c", str(cfg), "list", "create", "a@example.org"])
            timed(lm + ["-c", str(cfg), "list", "create", "b@example.org"])
            secs["members_import_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            secs["members_add_stdin_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "add", "b@example.org", "-"], input=stdin_text))
            # The same file again: every line already a member (INSERT OR IGNORE).
            secs["members_import_again"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            count = subprocess.run(lm + ["-c", str(cfg), "list", "show", "a@example.org"],
                                   capture_output=True, text=True).stdout
            assert f"members: {n}" in count, count
            results["sqlite_file_bytes"] = os.path.getsize(work / f"sqlite-{r}" / "state" / "listmilter.sqlite")

        # yaml store: the members live in the config file; what it costs is loading it
        # (at start and at every reload after an edit).
        ycfg = write_config(work / "yaml", "yaml", {"a@example.org": {"members": addrs}})
        results["yaml_file_bytes"] = ycfg.stat().st_size
        secs["yaml_load_and_open"] = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            store = open_store(config_mod.load(str(ycfg)))
            secs["yaml_load_and_open"].append(time.perf_counter() - t)
            assert store.member_count("a@example.org") == n
        secs["yaml_check_command"] = [timed(lm + ["-c", str(ycfg), "check"]) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{n} members, median of {args.repeat} (min in brackets), wall seconds of the whole command:")
    for key, values in secs.items():
        print(f"  {key:26} {median(values):7.3f}  ({min(values):.3f})")
    print(f"  sqlite file {results['sqlite_file_bytes']} bytes, yaml config {results['yaml_file_bytes']} bytes")
    path = save("import", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
