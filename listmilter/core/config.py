"""The config file: load, check, report errors as FILE:LINE: message.

Every key is documented in docs/configuration.md. Without a config file
listmilter runs on the built-in defaults below (SQLite in DEFAULT_STATE_DIR).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from listmilter.core import addresses, settings
from listmilter.core.errors import TemporaryError
from listmilter.paths import DEFAULT_STATE_DIR

DEFAULT_MILTER_SOCKET = "inet:8899@127.0.0.1"
DEFAULT_SOCKETMAP_SOCKET = "inet:8898@127.0.0.1"
SQLITE_NAME = "listmilter.sqlite"
# One-click links made before key ids ("u1", docs/upgrade.md) are accepted through this day (UTC).
OLD_LINKS_UNTIL = datetime.date(2027, 6, 30)

_SOCKET = re.compile(r"(inet:\d{1,5}(@[\w.\-]+)?|inet6:\d{1,5}(@[\w.:\-\[\]]+)?|(unix|local):/\S+)")
_HOSTPORT = re.compile(r"\[?([\w.\-:]+?)\]?:(\d{1,5})")


class ConfigError(TemporaryError):
    """A problem in the config file, with its place."""

    def __init__(self, path: str | None, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        where = path or "<built-in defaults>"
        super().__init__(f"{where}:{line}: {message}" if line else f"{where}: {message}")


@dataclass(frozen=True)
class ListDef:
    """A list defined in the config file (the yaml store)."""
    address: str
    settings: dict[str, Any]
    members: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Outgoing:
    smtp_host: str | None = "127.0.0.1"
    smtp_port: int = 25
    sendmail: str | None = None
    # The MTA's listener without milters (Postfix's re-injection smtpd): with it, a personal
    # post is queued at once and its copies go there from serve (core/fanout.py).
    reinject_host: str | None = None
    reinject_port: int = 0
    sessions: int = 8               # parallel SMTP sessions of one fan-out

    def describe(self) -> str:
        return f"sendmail: {self.sendmail}" if self.sendmail else f"smtp: {self.smtp_host}:{self.smtp_port}"

    @property
    def reinject(self) -> str | None:
        return f"{self.reinject_host}:{self.reinject_port}" if self.reinject_host else None


@dataclass(frozen=True)
class Web:
    """`listmilter web`: where it listens, and the public URL in the links it makes."""
    listen_host: str | None = None           # None: `listmilter web` has nowhere to listen
    listen_port: int = 0
    base_url: str | None = None              # None: no links, posts keep the mailto: List-Unsubscribe
    trusted_proxies: tuple[str, ...] = ()    # X-Forwarded-For is believed only from these
    old_links_until: datetime.date | None = OLD_LINKS_UNTIL   # None: old-format links refused

    @property
    def listen(self) -> str | None:
        return f"{self.listen_host}:{self.listen_port}" if self.listen_host else None

    def accepts_old_links(self, now: float) -> bool:
        """Old-format one-click links: accepted up to the end of old_links_until (UTC)."""
        if self.old_links_until is None:
            return False
        end = datetime.datetime.combine(self.old_links_until, datetime.time(), datetime.timezone.utc)
        return now < end.timestamp() + 86400


@dataclass(frozen=True)
class Config:
    path: str | None = None                       # None: built-in defaults, no file
    milter_socket: str = DEFAULT_MILTER_SOCKET
    socketmap_socket: str = DEFAULT_SOCKETMAP_SOCKET
    transport: str = "listmilter"
    backend: str = "sqlite"
    store_path: str = os.path.join(DEFAULT_STATE_DIR, SQLITE_NAME)
    dsn: str | None = None                        # PostgreSQL for all state (store.dsn); None: SQLite files
    password_file: str | None = None              # its password, read at each connection
    state_dir: str = DEFAULT_STATE_DIR
    lists: dict[str, ListDef] = field(default_factory=dict)
    outgoing: Outgoing = Outgoing()
    defaults: dict[str, Any] = field(default_factory=dict)
    defaults_origin: dict[str, str] = field(default_factory=dict)
    site_admin: str = "postmaster@localhost"
    log_target: str = "stderr"
    log_facility: str = "mail"
    web: Web = Web()
    # dns.nameservers: (IP address, port) for DMARC lookups; empty: the system's resolver (resolv.conf).
    dns_nameservers: tuple[tuple[str, int], ...] = ()
    # mta.type: whose hold queue a held post is on (app/holdqueue.py); mta.sendmail: Sendmail's program.
    mta: str = "postfix"
    sendmail_program: str = "/usr/sbin/sendmail"
    mtime: float | None = None

    def effective(self, name: str, list_settings: dict[str, Any]) -> settings.Effective:
        return settings.resolve(name, list_settings, self.defaults, self.defaults_origin)

    def list_settings(self, list_settings: dict[str, Any]) -> settings.ListSettings:
        """Every setting of a list, resolved (for where each value comes from: effective)."""
        return settings.resolve_all(list_settings, self.defaults)

    def owners(self, list_settings: dict[str, Any]) -> tuple[str, ...]:
        """Who gets a list's owner mail: its owners, or the site admin for a list without."""
        return tuple(self.effective("owners", list_settings).value) or (self.site_admin,)


def load(path: str | None, explicit: bool = True) -> Config:
    """Load and check the config file; a missing default file means built-in defaults."""
    if path is None:
        return Config()
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(path, None, "no such file") from None
        return Config()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, data.count(b"\n", 0, e.start) + 1,
                          f"not UTF-8 text (byte {data[e.start]:#04x})") from None
    return parse(text, path, st.st_mtime)


def parse(text: str, path: str = "<string>", mtime: float | None = None) -> Config:
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        problem = e.problem or e.context
        mark = e.problem_mark or e.context_mark
        if mark and e.context_mark and mark.line >= len(text.splitlines()):
            # The file ended inside something (a quote, a bracket): name where that began,
            # not the line after the last one.
            problem = f"{problem} ({e.context} that begins here)"
            mark = e.context_mark
        raise ConfigError(path, mark.line + 1 if mark else None, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        # A reader error (a character YAML does not allow) has a position, not a mark.
        position = getattr(e, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        raise ConfigError(path, line, f"YAML error: {str(e).splitlines()[0]}") from None
    return _Builder(path).build(root, mtime)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Builder:
    """Turns the composed YAML tree into a Config, checking every value."""

    TOP = {"milter", "socketmap", "store", "state_dir", "lists", "outgoing", "defaults", "site", "log", "web", "dns",
           "mta"}

    def __init__(self, path: str):
        self.path = path

    def error(self, node: yaml.Node | None, message: str) -> ConfigError:
        return ConfigError(self.path, _line(node) if node is not None else None, message)

    def mapping(self, node: yaml.Node, what: str, allowed: set[str] | None = None
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """{key: (key node, value node)}; unknown and repeated keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise self.error(knode, f"{what}: keys must be plain words")
            name = knode.value
            if allowed is not None and name not in allowed:
                raise self.error(knode, f"unknown key {name!r} in {what} (known: {', '.join(sorted(allowed))})")
            if name in out:
                raise self.error(knode, f"{what}: {name!r} given twice (first at line {_line(out[name][0])})")
            out[name] = (knode, vnode)
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"{what} must be a single value")
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        try:
            return yaml.load(yaml.serialize(node), Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:       # e.g. !!binary that is not base64, an unknown !!tag
            raise self.error(node, f"{what}: {getattr(e, 'problem', None) or e}") from None

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str) or not value:
            raise self.error(node, f"{what} must be a non-empty string (got {value!r})")
        return value

    def value(self, node: yaml.Node, what: str) -> Any:
        """A plain value: a scalar, or a sequence of scalars."""
        if isinstance(node, yaml.SequenceNode):
            return [self.scalar(item, what) for item in node.value]
        return self.scalar(node, what)

    def socket(self, node: yaml.Node, what: str) -> str:
        spec = self.string(node, what)
        if not _SOCKET.fullmatch(spec):
            raise self.error(node, f"{what}: {spec!r} is not a socket like inet:8899@127.0.0.1 or unix:/path")
        return spec

    def list_settings(self, node: yaml.Node, what: str, extra: frozenset[str] = frozenset()
                      ) -> tuple[dict[str, Any], dict[str, tuple[yaml.Node, yaml.Node]]]:
        items = self.mapping(node, what, set(settings.SETTINGS) | set(extra))
        out: dict[str, Any] = {}
        for name, (_knode, vnode) in items.items():
            if name in extra:
                continue
            try:
                out[name] = settings.parse(name, self.value(vnode, f"{what}.{name}"))
            except settings.SettingError as e:
                raise self.error(self._culprit(name, vnode), f"{what}.{name}: {e}") from None
        return out, items

    def _culprit(self, name: str, node: yaml.Node) -> yaml.Node:
        """The item of a sequence that a setting refuses (its line is the one to fix), else the node."""
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                try:
                    settings.parse(name, [self.scalar(item, name)])
                except (settings.SettingError, ConfigError):
                    found: yaml.Node = item
                    return found
        return node

    def build(self, root: yaml.Node | None, mtime: float | None) -> Config:
        if root is None:
            return Config(path=self.path, mtime=mtime)
        top = self.mapping(root, "the config file", self.TOP)
        kw: dict[str, Any] = {"path": self.path, "mtime": mtime}

        if "milter" in top:
            m = self.mapping(top["milter"][1], "milter", {"socket"})
            if "socket" in m:
                kw["milter_socket"] = self.socket(m["socket"][1], "milter.socket")
        if "socketmap" in top:
            m = self.mapping(top["socketmap"][1], "socketmap", {"socket", "transport"})
            if "socket" in m:
                kw["socketmap_socket"] = self.socket(m["socket"][1], "socketmap.socket")
            if "transport" in m:
                kw["transport"] = self.string(m["transport"][1], "socketmap.transport").rstrip(":")
        if "state_dir" in top:
            kw["state_dir"] = self.string(top["state_dir"][1], "state_dir")
        state_dir = kw.get("state_dir", DEFAULT_STATE_DIR)
        kw["store_path"] = os.path.join(state_dir, SQLITE_NAME)
        if "store" in top:
            self.store(top["store"][1], kw)
        if "outgoing" in top:
            kw["outgoing"] = self.outgoing(top["outgoing"][1])
        if "defaults" in top:
            defaults, items = self.list_settings(top["defaults"][1], "defaults")
            kw["defaults"] = defaults
            kw["defaults_origin"] = {k: f"defaults ({self.path}:{_line(items[k][0])})" for k in defaults}
        if "site" in top:
            m = self.mapping(top["site"][1], "site", {"admin"})
            if "admin" in m:
                admin = self.string(m["admin"][1], "site.admin")
                if not addresses.is_valid(admin):
                    raise self.error(m["admin"][1], f"site.admin: not a valid mail address: {admin!r}")
                kw["site_admin"] = admin
        if "log" in top:
            m = self.mapping(top["log"][1], "log", {"target", "facility"})
            if "target" in m:
                target = self.string(m["target"][1], "log.target")
                if target not in ("stderr", "syslog") and not target.startswith("/"):
                    raise self.error(m["target"][1], "log.target must be stderr, syslog or an absolute file path")
                kw["log_target"] = target
            if "facility" in m:
                kw["log_facility"] = self.string(m["facility"][1], "log.facility")
        if "web" in top:
            kw["web"] = self.web(top["web"][1])
        if "dns" in top:
            m = self.mapping(top["dns"][1], "dns", {"nameservers"})
            if "nameservers" in m:
                kw["dns_nameservers"] = self.nameservers(m["nameservers"][1])
        if "mta" in top:
            self.mta(top["mta"][1], kw)
        if "lists" in top:
            kw["lists"] = self.lists(top["lists"][1])
            if kw["lists"] and kw.get("backend", "sqlite") != "yaml":
                raise self.error(top["lists"][0], "lists: is the yaml store; set store.backend: yaml to use it")
        return Config(**kw)

    def store(self, node: yaml.Node, kw: dict[str, Any]) -> None:
        m = self.mapping(node, "store", {"backend", "path", "dsn", "password_file"})
        backend = "sqlite"
        if "backend" in m:
            backend = self.string(m["backend"][1], "store.backend")
            if backend not in ("sqlite", "yaml", "postgresql"):
                raise self.error(m["backend"][1],
                                 f"store.backend must be sqlite, yaml or postgresql (got {backend!r})")
            kw["backend"] = backend
        if "path" in m:
            if backend == "postgresql":
                raise self.error(m["path"][0], "store.path is the SQLite file; store.backend postgresql "
                                 "uses store.dsn")
            kw["store_path"] = self.string(m["path"][1], "store.path")
        if "dsn" in m:
            if backend == "sqlite":
                raise self.error(m["dsn"][0], "store.dsn needs store.backend: postgresql (lists in the "
                                 "database) or yaml (lists in this file, the rest in the database)")
            dsn = self.string(m["dsn"][1], "store.dsn")
            if re.search(r"(^|\s)password\s*=|^postgres(ql)?://[^/@]*:[^/@]*@", dsn):
                raise self.error(m["dsn"][1], "store.dsn: put the password in store.password_file "
                                 "(or PGPASSWORD, ~/.pgpass), not in the config file")
            kw["dsn"] = dsn
        elif backend == "postgresql":
            raise self.error(m.get("backend", (node, node))[1], "store.backend postgresql needs store.dsn, "
                             "such as 'host=db.example.org dbname=listmilter user=listmilter'")
        if "password_file" in m:
            if "dsn" not in m:
                raise self.error(m["password_file"][0], "store.password_file is for store.dsn")
            path = self.string(m["password_file"][1], "store.password_file")
            if not path.startswith("/"):
                raise self.error(m["password_file"][1], "store.password_file must be an absolute path")
            kw["password_file"] = path

    def mta(self, node: yaml.Node, kw: dict[str, Any]) -> None:
        m = self.mapping(node, "mta", {"type", "sendmail"})
        if "type" in m:
            kind = self.string(m["type"][1], "mta.type")
            if kind not in ("postfix", "sendmail"):
                raise self.error(m["type"][1], f"mta.type must be postfix or sendmail (got {kind!r})")
            kw["mta"] = kind
        if "sendmail" in m:
            if kw.get("mta") != "sendmail":
                raise self.error(m["sendmail"][0], "mta.sendmail is Sendmail's program; it needs mta.type: sendmail")
            path = self.string(m["sendmail"][1], "mta.sendmail")
            if not path.startswith("/"):
                raise self.error(m["sendmail"][1], "mta.sendmail must be an absolute path")
            kw["sendmail_program"] = path

    def outgoing(self, node: yaml.Node) -> Outgoing:
        m = self.mapping(node, "outgoing", {"smtp", "sendmail", "reinject", "sessions"})
        if ("smtp" in m) == ("sendmail" in m):
            raise self.error(node, "outgoing needs exactly one of smtp: HOST:PORT or sendmail: PATH")
        extra: dict[str, Any] = {}
        if "reinject" in m:
            extra["reinject_host"], extra["reinject_port"] = self.host_port(
                m["reinject"][1], "outgoing.reinject", "127.0.0.1:10025")
        if "sessions" in m:
            sessions = self.scalar(m["sessions"][1], "outgoing.sessions")
            if not isinstance(sessions, int) or isinstance(sessions, bool) or not 1 <= sessions <= 64:
                raise self.error(m["sessions"][1],
                                 f"outgoing.sessions must be a number from 1 to 64 (got {sessions!r})")
            extra["sessions"] = sessions
        if "sendmail" in m:
            path = self.string(m["sendmail"][1], "outgoing.sendmail")
            if not path.startswith("/"):
                raise self.error(m["sendmail"][1], "outgoing.sendmail must be an absolute path")
            return Outgoing(smtp_host=None, sendmail=path, **extra)
        host, port = self.host_port(m["smtp"][1], "outgoing.smtp", "127.0.0.1:25")
        return Outgoing(smtp_host=host, smtp_port=port, **extra)

    def host_port(self, node: yaml.Node, what: str, example: str) -> tuple[str, int]:
        spec = str(self.scalar(node, what))
        match = _HOSTPORT.fullmatch(spec)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise self.error(node, f"{what} must be HOST:PORT such as {example} (got {spec!r})")
        return match.group(1), int(match.group(2))

    def nameservers(self, node: yaml.Node) -> tuple[tuple[str, int], ...]:
        """HOST or HOST:PORT each, HOST an IP address ([v6]:PORT for IPv6 with a port)."""
        import ipaddress
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, "dns.nameservers must be a list such as [127.0.0.1, \"192.0.2.53:5353\"]")
        out = []
        for item in node.value:
            spec = str(self.scalar(item, "dns.nameservers")).strip()
            host, port = spec, 53
            match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", spec)
            if match:
                host = match.group(1) or match.group(3)
                port = int(match.group(2) or match.group(4))
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise self.error(item, f"dns.nameservers: {spec!r} is not an IP address or IP:PORT "
                                 "such as 127.0.0.1:5353 or [::1]:5353") from None
            if not 0 < port < 65536:
                raise self.error(item, f"dns.nameservers: port out of range in {spec!r}")
            out.append((host.strip("[]"), port))
        return tuple(out)

    def web(self, node: yaml.Node) -> Web:
        m = self.mapping(node, "web", {"listen", "base_url", "trusted_proxies", "old_links_until"})
        kw: dict[str, Any] = {}
        if "listen" in m:
            spec = str(self.scalar(m["listen"][1], "web.listen"))
            match = _HOSTPORT.fullmatch(spec)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise self.error(m["listen"][1], f"web.listen must be HOST:PORT such as 127.0.0.1:8025 (got {spec!r})")
            kw["listen_host"], kw["listen_port"] = match.group(1), int(match.group(2))
        if "base_url" in m:
            url = self.string(m["base_url"][1], "web.base_url").rstrip("/")
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?(/[A-Za-z0-9._~/\-]*)?", url):
                raise self.error(m["base_url"][1], "web.base_url must be an http(s) URL without query, "
                                 f"such as https://lists.example.org (got {url!r})")
            kw["base_url"] = url
        if "trusted_proxies" in m:
            value = self.value(m["trusted_proxies"][1], "web.trusted_proxies")
            items = value if isinstance(value, list) else str(value).replace(",", " ").split()
            import ipaddress
            for item in items:
                try:
                    ipaddress.ip_address(str(item))
                except ValueError:
                    raise self.error(m["trusted_proxies"][1],
                                     f"web.trusted_proxies: not an IP address: {item!r}") from None
            kw["trusted_proxies"] = tuple(str(i) for i in items)
        if "old_links_until" in m:
            node = m["old_links_until"][1]
            value = self.scalar(node, "web.old_links_until")
            if isinstance(value, str):
                try:
                    value = datetime.date.fromisoformat(value)
                except ValueError:
                    pass
            if value is not False and (type(value) is not datetime.date):
                raise self.error(node, "web.old_links_until must be a date such as 2027-06-30, "
                                 f"or false to refuse old links now (got {value!r})")
            kw["old_links_until"] = value or None
        return Web(**kw)

    def lists(self, node: yaml.Node) -> dict[str, ListDef]:
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return {}
        out: dict[str, ListDef] = {}
        for name, (knode, vnode) in self.mapping(node, "lists").items():
            if not addresses.is_valid(name):
                raise self.error(knode, f"lists: {name!r} is not a list address like dev@example.org")
            lkey = addresses.key(name)
            if lkey in out:
                raise self.error(knode, f"lists: {name!r} is defined twice (case does not matter)")
            if isinstance(vnode, yaml.ScalarNode) and vnode.value in ("", "~", "null"):
                list_settings: dict[str, Any] = {}
                items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            else:
                list_settings, items = self.list_settings(vnode, f"lists.{name}", frozenset({"members"}))
            members = self.members(items["members"][1], name) if "members" in items else ()
            out[lkey] = ListDef(lkey, list_settings, members, _line(knode))
        return out

    def members(self, node: yaml.Node, list_name: str) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"lists.{list_name}.members must be a list of addresses")
        seen: set[str] = set()
        out = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode) or not addresses.is_valid(item.value.strip()):
                shown = item.value if isinstance(item, yaml.ScalarNode) else "a nested value"
                raise self.error(item, f"lists.{list_name}.members: not a valid mail address: {shown!r}")
            address = item.value.strip()
            k = addresses.key(address)
            if k not in seen:
                seen.add(k)
                out.append(address)
        return tuple(out)
