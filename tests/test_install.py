"""docs/install.md, run as written: install, the host without systemd (7b), the
first list, uninstall; and what `./bootstrap` leaves behind is adopted.

Everything happens in a private root: a mount namespace where /etc (a copy
of this machine's), /opt, /usr/local, /var, /run and /home are private
folders, and a network namespace of its own (its own 127.0.0.1:25). Postfix
is Debian's, with Debian's master.cf (chrooted daemons), set up as an
"Internet Site" for example.org, as install.md expects to find it. The
system itself is not touched.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "docs" / "install.md"


def sections(path: Path) -> dict[str, list[list[str]]]:
    """{heading: [code block, ...]}: the 4-space-indented blocks under each `## ` heading."""
    out: dict[str, list[list[str]]] = {}
    heading, block = "", None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            heading, block = line[3:].strip(), None
            out[heading] = []
        elif line.startswith("    ") and heading:
            if block is None:
                block = []
                out[heading].append(block)
            block.append(line[4:])
        else:
            block = None
    return out


def section(docs: dict, prefix: str) -> list[list[str]]:
    (name,) = [k for k in docs if k.startswith(prefix)]
    return docs[name]


MAIN_CF = """\
compatibility_level = 3.6
myhostname = mx.example.org
mydomain = example.org
myorigin = $mydomain
mydestination = $myhostname, example.org, localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtp_dns_support_level = disabled
maillog_file = /var/log/mail.log
"""


def _private_root(t: Path) -> None:
    shutil.copytree("/etc", t / "etc", symlinks=True)
    shutil.rmtree(t / "etc" / "listmilter", ignore_errors=True)
    (t / "etc" / "postfix" / "main.cf").write_text(MAIN_CF)
    for d in ("opt", "usr-local/bin", "usr-local/share/man", "run", "home", "var/lib/postfix", "var/spool/postfix",
              "var/log", "var/tmp", "var/mail"):
        (t / d).mkdir(parents=True, exist_ok=True)
    (t / "var" / "tmp").chmod(0o1777)
    shutil.chown(t / "var" / "lib" / "postfix", "postfix", "postfix")
    (t / "var" / "run").symlink_to("/run")
    # The source tree as an admin has it: what git tracks (pip builds in it).
    src = t / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, (f.decode() for f in files)):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)


def _wheelhouse(t: Path) -> Path:
    """listmilter's dependencies and build backend as wheels: the namespace has no network."""
    wheels = t / "wheels"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, "download", "-d", str(wheels), "setuptools>=61", "wheel"], check=True,
                   capture_output=True, timeout=300)
    for w in wheels.glob("listmilter-*"):
        w.unlink()          # built from the source tree by pip install ., as install.md says
    return wheels


def _script(t: Path, wheels: Path) -> str:
    docs = sections(INSTALL)
    out = t / "out"
    run = lambda block: "\n".join(block)  # noqa: E731
    (user,) = section(docs, "2.")
    (program,) = section(docs, "3.")
    assert "/opt/listmilter/bin/pip install ." in program
    program = [line.replace("pip install .", f"pip install -q --no-index --find-links {wheels} .")
               for line in program]
    (folders,) = section(docs, "4.")
    (config,) = section(docs, "5.")
    main_cf, master_cf = section(docs, "6.")
    serve, web, day = section(docs, "7b.")
    reload_line, stop_line = day
    assert "--signal USR1" in reload_line and "--retry TERM" in stop_line
    (check,) = section(docs, "8.")
    create, post, follow = section(docs, "9.")
    remove_postfix, _systemd, stop, files = section(docs, "Uninstalling")
    assert len(files) == 6
    assert _systemd == ["systemctl disable --now listmilter listmilter-web"]
    (swaks,) = post
    (trace,) = follow
    bootstrap_venv = shlex.quote(str(Path(sys.executable).parent / "listmilter"))
    return f"""
set -eux
cleanup() {{      # nothing started here outlives the test, whatever failed
    for f in /run/listmilter.pid /run/listmilter-web.pid; do [ -f $f ] && kill -9 "$(cat $f)" || true; done
    postfix abort 2>/dev/null || true
}}
trap cleanup EXIT
for d in etc opt run home var; do mount --bind {t}/$d /$d; done
mount --bind {t}/usr-local /usr/local
ip link set lo up
/usr/lib/postfix/configure-instance.sh     # what Debian's postfix start does: the chroot's files
postfix start
cd {t}/src
mkdir -p {out}

# What ./bootstrap (and the README's next commands) leave: root's files in /var/lib/listmilter.
{bootstrap_venv} list create old@example.org --owner you@example.org
stat -c '%U' /var/lib/listmilter/listmilter.sqlite > {out}/bootstrap-owner

{run(user)}
{run(program)}
# Before section 4, the service user meets root's files: in root's folder, and (what the
# tmpfiles entry of earlier install.md versions did) with the folder alone handed over.
serve_as_listmilter() {{
    (cd / && timeout 20 runuser -u listmilter -- /usr/local/bin/listmilter serve) 2> {out}/serve-$1.err \
        && echo 0 > {out}/serve-$1.rc || echo $? > {out}/serve-$1.rc
}}
serve_as_listmilter root-folder
chown listmilter:listmilter /var/lib/listmilter
serve_as_listmilter root-files
{run(folders)}
{run(config)}
{run(main_cf)}
{run(master_cf)}
{run(serve)}
for i in $(seq 100); do [ -S /var/spool/postfix/listmilter/socketmap.sock ] && break; sleep 0.1; done
printf 'web:\\n  listen: "127.0.0.1:8025"\\n' >> /etc/listmilter/listmilter.yaml
{run(web)}
for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && break; sleep 0.1; done
(exec 3<>/dev/tcp/127.0.0.1/8025) && echo web-up > {out}/web
ps -o user= -p "$(cat /run/listmilter.pid)" > {out}/serve-user
cat /run/listmilter.pid /run/listmilter-web.pid > {out}/pids
stat -c '%a %U %G' /var/spool/postfix/listmilter/milter.sock > {out}/socket
stat -c '%U' /var/lib/listmilter/listmilter.sqlite > {out}/store-owner
{reload_line}
for i in $(seq 100); do grep -q 'reload requested (SIGUSR1)' /var/log/listmilter.log && break; sleep 0.1; done
grep -c 'reload requested (SIGUSR1)' /var/log/listmilter.log > {out}/reloads
{run(check)} > {out}/check.out 2> {out}/check.err
{run(create)} > {out}/create.out
{swaks} > {out}/swaks.out
QUEUEID=$(sed -n 's/.*queued as \\([0-9A-Za-z]*\\).*/\\1/p' {out}/swaks.out | tail -1)
for i in $(seq 100); do
    {trace.replace("QUEUEID", '"$QUEUEID"')} > {out}/trace.out || true
    grep -q 'status=expanded' {out}/trace.out && break
    sleep 0.2
done
listmilter list ls > {out}/lists.out

{run(remove_postfix)}
{run(stop)}
{run(files)}
getent passwd listmilter > {out}/user-after || true
getent group listmilter >> {out}/user-after || true
find /etc /opt /usr/local /var /run -name '*listmilter*' > {out}/files-after 2>/dev/null || true
(postconf -n; postconf -M; postconf -P) | grep -i listmilter > {out}/postfix-after || true
for pid in $(cat {out}/pids); do kill -0 $pid 2>/dev/null && echo $pid; done > {out}/processes-after || true
postfix check > {out}/postfix-check 2>&1
postfix stop
postfix start
postfix status && echo "postfix status: running" > {out}/postfix-status
postfix stop
"""


# The mta tier: its script starts Postfix, serve and web (inside unshare, where conftest's guard cannot see).
@pytest.mark.mta
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_install_md_as_written_without_systemd_then_uninstall(tmp_path):
    t = tmp_path
    t.chmod(0o755)
    _private_root(t)
    wheels = _wheelhouse(t)
    script = _script(t, wheels)
    (t / "install.sh").write_text(script)
    proc = subprocess.run(["unshare", "--mount", "--net", "--fork", "bash", str(t / "install.sh")],
                          capture_output=True, text=True, timeout=900)
    out = t / "out"
    log = (t / "var" / "log")
    assert proc.returncode == 0, proc.stderr[-6000:] + "\n" + _tail(log / "listmilter.log") + _tail(log / "mail.log")
    read = lambda name: (out / name).read_text()  # noqa: E731

    # ./bootstrap's files were root's; the service user could not open them, and says so
    # as troubleshooting.md has it; section 4 adopted them.
    assert read("bootstrap-owner").strip() == "root"
    troubleshooting = (ROOT / "docs" / "troubleshooting.md").read_text()
    message = "listmilter: sqlite store /var/lib/listmilter/listmilter.sqlite: cannot open: " \
              "unable to open database file"
    assert f"### `{message}` (exit 75)" in troubleshooting
    for case in ("root-folder", "root-files"):
        assert read(f"serve-{case}.rc").strip() == "75"
        err = read(f"serve-{case}.err").strip().splitlines()[-1]     # after set -x lines
        assert err == message, (case, err)
    assert read("store-owner").strip() == "listmilter"
    assert read("lists.out").splitlines() == ["dev@example.org\t2", "old@example.org\t0"]

    # 7b: serve as listmilter, sockets as the unit makes them, web up, reload by USR1.
    assert read("serve-user").strip() == "listmilter"
    assert read("socket").strip() == "770 listmilter postfix"
    assert read("web").strip() == "web-up"
    assert read("reloads").strip() == "1"

    # 8: the live check passed (set -e), and said so for every part.
    check = read("check.out")
    for part in ("live: milter unix:/var/spool/postfix/listmilter/milter.sock: answers",
                 "live: serve: listmilter ", "live: socketmap unix:/var/spool/postfix/listmilter/socketmap.sock",
                 "live: outgoing smtp: 127.0.0.1:25: EHLO answered 250",
                 "live: postfix: postmap -q old@example.org socketmap:unix:listmilter/socketmap.sock:recipients "
                 "-> old@example.org"):
        assert part in check, (part, check)
    assert "postfix" not in read("check.err"), read("check.err")

    # 9: the post was expanded, and trace followed it to the (deferred: no network here) deliveries.
    trace = read("trace.out")
    assert "status=expanded, members=2" in trace, trace
    assert re.search(r"to=<(alice@example.net|bob@example.com)>", trace), trace
    assert re.search(r"^post [0-9A-F]+: 1 queue id \(", trace, re.M), trace

    # Uninstalled: no user, no files, no Postfix line; Postfix checks clean and starts.
    assert read("user-after") == ""
    assert read("files-after") == "", read("files-after")
    assert read("postfix-after") == ""
    assert read("processes-after") == ""
    assert read("postfix-check") == "", read("postfix-check")
    assert read("postfix-status") == "postfix status: running\n"


def _tail(path: Path, n: int = 40) -> str:
    try:
        return f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-n:]) + "\n"
    except FileNotFoundError:
        return ""
