"""`listmilter check`, the MTA side: is Postfix wired to listmilter as docs/postfix.md says?

Everything is asked from `postconf` (MAIL_CONFIG chooses the instance), so
what is checked is what Postfix itself reads. Each problem is one line that
says what to set.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass, field

PARAMS = ("smtpd_milters", "non_smtpd_milters", "milter_default_action", "message_size_limit",
          "transport_maps", "local_recipient_maps", "relay_recipient_maps", "virtual_mailbox_maps",
          "virtual_alias_maps", "queue_directory", "fallback_transport", "local_transport",
          "virtual_transport", "local_destination_concurrency_limit")
RECIPIENT_MAPS = ("local_recipient_maps", "virtual_mailbox_maps", "relay_recipient_maps", "virtual_alias_maps")


@dataclass
class Postfix:
    params: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    services: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ask(cls) -> "Postfix | None":
        """Postfix's parameters, None when there is no postconf."""
        if not shutil.which("postconf", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return None
        proc = _postconf("-x", *PARAMS)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return cls(error=lines[-1] if lines else f"postconf exited {proc.returncode}")
        params = {}
        for line in proc.stdout.splitlines():
            name, sep, value = line.partition(" = ")
            if sep:
                params[name.strip()] = value.strip()
            elif line.endswith(" ="):
                params[line[:-2].strip()] = ""
        return cls(params=params)

    def param(self, name: str) -> str:
        if name not in self.params:
            proc = _postconf("-x", name)
            self.params[name] = proc.stdout.partition(" = ")[2].strip() if proc.returncode == 0 else ""
        return self.params[name]

    def service(self, name: str) -> str | None:
        """The master.cf line of NAME/unix, None if there is none."""
        if name not in self.services:
            proc = _postconf("-M", f"{name}/unix")
            self.services[name] = proc.stdout.strip() if proc.returncode == 0 else ""
        return self.services[name] or None


def _postconf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    try:
        return subprocess.run(["postconf", *args], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(["postconf"], 1, "", str(e))


# -- sockets: listmilter writes inet:PORT@HOST, Postfix inet:HOST:PORT --------------
def _listmilter_socket(spec: str) -> tuple:
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        return ("unix", os.path.normpath(rest))
    port, _, host = rest.partition("@")
    host = host.strip("[]") or "127.0.0.1"
    return ("inet", "127.0.0.1" if host in ("localhost", "0.0.0.0") else
            "::1" if host == "::" else host, port)


def _postfix_socket(spec: str, queue_dir: str) -> list[tuple]:
    """Every socket a Postfix endpoint may mean: a unix path is relative to the
    queue directory, and so is an absolute one for a chrooted daemon."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            return [("unix", os.path.normpath(os.path.join(queue_dir, rest)))]
        return [("unix", os.path.normpath(rest)), ("unix", os.path.normpath(queue_dir + rest))]
    if kind in ("inet", "inet6"):
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        return [("inet", "127.0.0.1" if host == "localhost" else host, port)]
    return []


def postfix_form(spec: str, queue_dir: str) -> str:
    """How main.cf should name a listmilter socket."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        path = os.path.normpath(rest)
        prefix = os.path.normpath(queue_dir) + "/"
        return f"unix:{path[len(prefix):]}" if path.startswith(prefix) else f"unix:{path}"
    port, _, host = rest.partition("@")
    host = host or "127.0.0.1"
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


def _milters(value: str) -> list[tuple[str, dict[str, str]]]:
    """smtpd_milters entries: `spec` or `{ spec, name=value, ... }` (Postfix >= 3.0)."""
    out: list[tuple[str, dict[str, str]]] = []
    for m in re.finditer(r"\{([^}]*)\}|([^\s,{}]+)", value):
        if m.group(2):
            out.append((m.group(2), {}))
            continue
        parts = [p for p in re.split(r"[\s,]+", re.sub(r"\s*=\s*", "=", m.group(1)).strip()) if p]
        if parts:
            out.append((parts[0], dict(p.split("=", 1) for p in parts[1:] if "=" in p)))
    return out


def _tables(value: str, name: str) -> list[str]:
    """The sockets of every `socketmap:SOCKET:NAME` table in a map list."""
    return [m.group(1) for m in re.finditer(r"socketmap:((?:inet|unix|local):[^\s,{}]+):(\w+)", value)
            if m.group(2) == name]


# -- the checks ---------------------------------------------------------------------
def check(pf: Postfix, cfg, report) -> None:
    queue_dir = pf.param("queue_directory") or "/var/spool/postfix"
    me = _listmilter_socket(cfg.milter_socket)
    milter = postfix_form(cfg.milter_socket, queue_dir)
    for param in ("smtpd_milters", "non_smtpd_milters"):
        entries = [(spec, opts) for spec, opts in _milters(pf.param(param))
                   if me in _postfix_socket(spec, queue_dir)]
        if not entries:
            current = pf.param(param)
            report.errors.append(
                f"postfix: {param} does not name listmilter's milter ({cfg.milter_socket}): set "
                f"{param} = {(current + ' ') if current else ''}{milter}")
        for spec, opts in entries:
            if "default_action" in opts:
                _default_action(report, f"{param} gives {spec} default_action={opts['default_action']}",
                                opts["default_action"], f"drop default_action from {param}")

    _default_action(report, f"milter_default_action = {pf.param('milter_default_action') or 'tempfail'}",
                    pf.param("milter_default_action") or "tempfail", "set milter_default_action = accept")

    table = _listmilter_socket(cfg.socketmap_socket)
    sm = postfix_form(cfg.socketmap_socket, queue_dir)
    ours = lambda specs: any(table in _postfix_socket(s, queue_dir) for s in specs)  # noqa: E731
    _check_route(pf, cfg.transport, ours, report)
    local_maps = pf.param("local_recipient_maps")
    last = (re.split(r"[\s,]+", local_maps.strip()) or [""])[-1]
    if ours(_tables(local_maps, "recipients")) and not ours(_tables(last, "recipients")):
        report.warnings.append(
            "postfix: local_recipient_maps asks listmilter's socketmap before other tables: while "
            "listmilter is down, local users get 451 too; put socketmap:...:recipients last")
    if not any(ours(_tables(pf.param(p), "recipients")) for p in RECIPIENT_MAPS):
        line = (f"postfix: no recipient map uses listmilter's socketmap ({cfg.socketmap_socket}), so Postfix "
                f"refuses list addresses it does not otherwise know: add socketmap:{sm}:recipients to "
                "local_recipient_maps (list domain in mydestination), virtual_mailbox_maps or "
                "relay_recipient_maps, whichever the list domain's address class uses")
        if "local_recipient_maps" in pf.params and not pf.param("local_recipient_maps"):
            report.warnings.append(line + " (local_recipient_maps is empty: every local address is accepted)")
        else:
            report.errors.append(line)

    _check_pipe(pf, cfg.transport, report)


# Copies a second a fan-out keeps up at least (docs/performance.md measures several times more):
# what the pipe's time limit is held against.
SAFE_COPIES_PER_SECOND = 200


def check_fanout(pf: Postfix, cfg, report, biggest: int) -> None:
    """The re-injection listener (outgoing.reinject) and the pipe's time for the biggest
    personal list (`biggest` members), as docs/postfix.md gives them."""
    host, port = cfg.outgoing.reinject_host, cfg.outgoing.reinject_port
    proc = _postconf("-M", f"{host}:{port}/inet")
    line = proc.stdout.strip() if proc.returncode == 0 else ""
    if not line:
        report.errors.append(
            f"postfix: no master.cf service listens on outgoing.reinject {host}:{port}: personal posts "
            f"wait in the queue until it does; add the re-injection listener docs/postfix.md gives")
    elif "no_milters" not in line and not re.search(r"smtpd_milters=(\s|$)", line):
        report.errors.append(
            f"postfix: the master.cf service on {host}:{port} (outgoing.reinject) runs the milters: "
            "give it -o smtpd_milters= -o receive_override_options=no_milters,no_header_body_checks")
    limit_name = f"{cfg.transport}_time_limit"
    limit = _seconds(pf.param(limit_name) or pf.param("command_time_limit") or "1000s")
    needed = biggest // SAFE_COPIES_PER_SECOND
    if limit is not None and needed > limit:
        report.warnings.append(
            f"postfix: the biggest personal list has {biggest} members; at {SAFE_COPIES_PER_SECOND} copies a "
            f"second its fan-out takes {needed}s, more than the pipe's {limit}s ({limit_name}): each attempt "
            f"goes on where the last stopped, but set {limit_name} = {needed * 2}s in main.cf")


def _seconds(value: str) -> int | None:
    m = re.fullmatch(r"(\d+)([smhdw]?)", value.strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _default_action(report, what: str, action: str, fix: str) -> None:
    """accept: other mail flows while listmilter is down (list addresses wait on the socketmap)."""
    if action == "tempfail":
        report.warnings.append(f"postfix: {what}: while listmilter is down, every message waits, "
                               f"not only list mail; {fix} (list mail still waits: docs/postfix.md)")
    elif action != "accept":
        report.warnings.append(f"postfix: {what}: while listmilter is down, every message is refused; "
                               f"{fix} (list mail still waits: docs/postfix.md)")


def _check_route(pf: Postfix, name: str, ours, report) -> None:
    """How role addresses (and list mail the milter missed) reach the pipe transport."""
    via_transport_maps = ours(_tables(pf.param("transport_maps"), "transport"))
    if via_transport_maps:
        # trivial-rewrite asks transport_maps for every address it routes, so a
        # table that is down makes Postfix answer 451 to all mail.
        report.warnings.append(
            "postfix: transport_maps uses listmilter's socketmap: Postfix looks up every address there, so "
            f"while listmilter is down all mail gets 451; remove it and set fallback_transport = {name}")
    if pf.param("fallback_transport") == name:
        local = pf.param("local_transport") or "local:$myhostname"
        if not local.startswith("local:") and local != "local":
            report.errors.append(f"postfix: fallback_transport = {name} works only with local(8), but "
                                 f"local_transport = {local}: list addresses would not reach {name}")
        limit = pf.param("local_destination_concurrency_limit")
        if limit.isdigit() and int(limit) < 10:
            report.warnings.append(f"postfix: local_destination_concurrency_limit = {limit}: local(8) hands a "
                                   f"list's DSNs (all to one -bounces@ address) to {name} {limit} at a time; "
                                   "set local_destination_concurrency_limit = 20")
    elif not via_transport_maps and pf.param("virtual_transport") != name:
        report.errors.append(f"postfix: nothing routes list and role addresses to the {name} pipe "
                             f"transport: set fallback_transport = {name} (list domain in mydestination)")


def _check_pipe(pf: Postfix, name: str, report) -> None:
    want = (f"{name} unix - n n - - pipe flags=Rq user=listmilter null_sender= "
            "argv=/usr/local/bin/listmilter deliver ${recipient} ${sender}")
    line = pf.service(name)
    if line is None:
        report.errors.append(f"postfix: master.cf has no {name}/unix service for socketmap.transport; "
                             f"add: {want}")
        return
    fields = line.split()
    command, args = (fields[7], fields[8:]) if len(fields) > 7 else ("", [])
    if command != "pipe":
        report.errors.append(f"postfix: master.cf service {name}/unix runs {command or 'nothing'}, not pipe; "
                             f"make it: {want}")
        return
    opts = {}
    argv: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":         # a main.cf override, not a pipe attribute
            i += 2
            continue
        if arg.startswith("argv="):
            argv = [arg[5:], *args[i + 1:]]
            break
        key, _, value = arg.partition("=")
        opts[key] = value
        i += 1
    if not _runs_deliver(argv):
        report.errors.append(f"postfix: master.cf service {name}/unix does not run `listmilter deliver`: "
                             "set argv=/usr/local/bin/listmilter deliver ${recipient} ${sender}")
    elif "${recipient}" not in argv:
        report.errors.append(f"postfix: master.cf service {name}/unix does not pass ${{recipient}}: "
                             "set argv=/usr/local/bin/listmilter deliver ${recipient} ${sender}")
    user = opts.get("user", "").partition(":")[0]
    try:
        uid = pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        report.errors.append(f"postfix: master.cf service {name}/unix runs as user {user}, which does not "
                             "exist; set user=listmilter (the user `listmilter serve` runs as)")
    else:
        if uid is None or uid == 0:
            report.errors.append(f"postfix: master.cf service {name}/unix needs a user= that is not root "
                                 "(pipe refuses root); set user=listmilter (the user `listmilter serve` "
                                 "runs as)")
    limit = pf.param(f"{name}_destination_recipient_limit")
    if limit != "1":
        report.errors.append(f"postfix: {name}_destination_recipient_limit = {limit or 'unset'}: "
                             f"`listmilter deliver` takes one recipient; set {name}_destination_recipient_limit = 1")


def _runs_deliver(argv: list[str]) -> bool:
    """argv runs `listmilter [-c CONFIG] deliver`, maybe through env(1) or `python -m listmilter`."""
    prog = list(argv)
    if prog and os.path.basename(prog[0]) == "env":
        prog = prog[1:]
        while prog and ("=" in prog[0] or prog[0].startswith("-")):
            prog = prog[1:]
    if not prog:
        return False
    name = os.path.basename(prog[0])
    if name.startswith("python") and prog[1:3] == ["-m", "listmilter"]:
        rest = prog[3:]
    elif name == "listmilter":
        rest = prog[1:]
    else:
        return False
    if rest[:1] in (["-c"], ["--config"]):
        rest = rest[2:]
    return rest[:1] == ["deliver"]
