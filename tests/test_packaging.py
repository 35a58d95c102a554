"""What an admin installs: the sdist and wheel (with their data), the systemd
units, the tmpfiles entry and the man pages."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.bed.net import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("listmilter.service", "listmilter-web.service")
MAN = {"man8": "listmilter.8", "man5": "listmilter.yaml.5"}


def _man_tree(tmp_path: Path) -> Path:
    """The man pages laid out as man(1) looks for them."""
    tree = tmp_path / "man"
    for section, name in MAN.items():
        (tree / section).mkdir(parents=True)
        shutil.copy(ROOT / "man" / name, tree / section / name)
    return tree


@pytest.mark.skipif(not shutil.which("systemd-analyze"),
                    reason="systemd-analyze not installed (./bootstrap installs systemd)")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    # verify wants ExecStart's program to exist: point it at this checkout's listmilter.
    program = Path(sys.executable).parent / "listmilter"
    assert program.exists(), program
    units = []
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        assert "ExecStart=/usr/local/bin/listmilter " in text
        (tmp_path / name).write_text(text.replace("/usr/local/bin/listmilter", str(program)))
        units.append(str(tmp_path / name))
    # verify also looks up the Documentation= man pages.
    env = {**os.environ, "MANPATH": str(_man_tree(tmp_path))}
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_service_unit_runs_hardened_as_its_own_user_and_reloads_with_sigusr1():
    unit = (ROOT / "systemd" / "listmilter.service").read_text().splitlines()
    for line in ("ExecStart=/usr/local/bin/listmilter serve", "ExecReload=/bin/kill -USR1 $MAINPID",
                 "User=listmilter", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "UMask=0007", "Type=simple",
                 "ReadWritePaths=/var/lib/listmilter /var/spool/postfix/listmilter"):
        assert line in unit, line
    assert [x for x in unit if x.startswith("ReadWritePaths=")] == \
        ["ReadWritePaths=/var/lib/listmilter /var/spool/postfix/listmilter"]
    web = (ROOT / "systemd" / "listmilter-web.service").read_text().splitlines()
    for line in ("ExecStart=/usr/local/bin/listmilter web", "User=listmilter", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/listmilter"):
        assert line in web, line
    # Room for the web server's connections besides its other files (listmilter/web.py).
    from listmilter import web as web_mod
    [limit] = [int(x.split("=")[1]) for x in web if x.startswith("LimitNOFILE=")]
    assert limit >= web_mod.CONNECTION_LIMIT + web_mod.SPARE_FILES


@pytest.mark.skipif(not shutil.which("systemd-tmpfiles"), reason="systemd-tmpfiles not installed")
def test_tmpfiles_makes_the_socket_folder_in_postfix_chroot(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nlistmilter:x:990:990::/var/lib/listmilter:/bin/false\n"
                                     "postfix:x:991:991::/var/spool/postfix:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nlistmilter:x:990:\npostfix:x:991:\n")
    proc = subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}",
                           str(ROOT / "systemd" / "listmilter.tmpfiles")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    sockets = (root / "var/spool/postfix/listmilter").stat()
    assert (sockets.st_mode & 0o7777, sockets.st_uid, sockets.st_gid) == (0o2750, 990, 991)
    state = (root / "var/lib/listmilter").stat()
    assert (state.st_mode & 0o7777, state.st_uid, state.st_gid) == (0o751, 990, 990)


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed (./bootstrap installs groff-base)")
@pytest.mark.parametrize("name", MAN.values())
def test_man_pages_render_without_warnings(name, tmp_path):
    page = ROOT / "man" / name
    proc = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # man(1) as an admin reads the page (./bootstrap installs man-db; no man, no pass).
    assert shutil.which("man"), "man not installed: run ./bootstrap (it installs man-db)"
    proc = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "80"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "SEE ALSO" in re.sub(".\b", "", proc.stdout)     # without overstrike bold


def test_every_per_list_setting_is_documented_in_the_man_page_and_the_guide():
    """listmilter.yaml(5) has an entry for each setting, and docs/configuration.md a row with its
    default as `listmilter list show` would print it: a new setting cannot ship undocumented."""
    from listmilter.core import settings
    man = (ROOT / "man" / "listmilter.yaml.5").read_text()
    guide = (ROOT / "docs" / "configuration.md").read_text()
    assert [n for n in settings.SETTINGS if f".TP\n.B {n}\n" not in man] == []
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", guide, re.M))
    assert [n for n in settings.SETTINGS if n not in rows] == []
    for name, setting in settings.SETTINGS.items():
        if isinstance(setting.default, int) and not isinstance(setting.default, bool):
            assert rows[name].strip() == f"`{setting.default}`", (name, rows[name])


@pytest.mark.mta
def test_sdist_and_wheel_install_into_a_fresh_venv_and_serve(tmp_path):
    """Build as an admin would, install the wheel into a clean virtualenv of
    Debian's python3, run check and serve from it: catches missing package data."""
    dist = tmp_path / "dist"
    # The sdist, from the files git tracks (a fresh clone, as CI has).
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        target = src / f.decode()
        if (ROOT / f.decode()).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f.decode(), target)
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"],
                   cwd=src, check=True, capture_output=True, timeout=120)
    sdist = next(dist.glob("listmilter-*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        t.extractall(tmp_path / "unpacked")
    for needed in ("conf/listmilter.yaml", "man/listmilter.8", "man/listmilter.yaml.5",
                   "systemd/listmilter.service", "systemd/listmilter-web.service",
                   "systemd/listmilter.tmpfiles", "docs/install.md", "listmilter/cli/__init__.py",
                   "listmilter/core/plan.py", "listmilter/mta/handoff.py", "listmilter/app/notices.py"):
        assert needed in names, needed
    templates = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "listmilter/app/templates").rglob("*")
                       if p.is_file())
    assert templates, "no templates found: the package data moved?"
    for t in templates:
        assert t in names, t

    # The wheel, from the unpacked sdist, so a file missing from the sdist shows here too.
    unpacked = next((tmp_path / "unpacked").iterdir())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(unpacked)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel = next(dist.glob("listmilter-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
    assert "listmilter-0.1.0.data/data/share/man/man8/listmilter.8" in wnames
    for t in templates:
        assert t in wnames, t

    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (venv / "share/man/man8/listmilter.8").exists()
    listmilter = str(venv / "bin/listmilter")
    # Run from elsewhere, so nothing is imported from this checkout.
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path)}

    cfg = tmp_path / "listmilter.yaml"
    milter, table = free_port(), free_port()
    cfg.write_text(f"milter: {{socket: 'inet:{milter}@127.0.0.1'}}\nsocketmap: {{socket: 'inet:{table}@127.0.0.1'}}\n"
                   f"state_dir: {tmp_path}/state\nlog: {{target: stderr}}\n")
    proc = subprocess.run([listmilter, "-c", str(cfg), "list", "create", "dev@example.org", "--owner",
                           "o@example.org"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([listmilter, "-c", str(cfg), "check"], capture_output=True, text=True,
                          env={**env, "MAIL_CONFIG": str(tmp_path / "no-postfix")}, cwd=tmp_path, timeout=60)
    assert "store: sqlite" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    serve = subprocess.Popen([listmilter, "-c", str(cfg), "serve"], stderr=subprocess.PIPE, text=True, env=env,
                             cwd=tmp_path)
    try:
        wait_for_port(milter)
        wait_for_port(table)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        err = serve.stderr.read()
        serve.stderr.close()
    assert "starting listmilter" in err and "stopping listmilter" in err and "Traceback" not in err, err
