"""`listmilter web` for real: the command on a free port with a real SQLite store,
behind a private nginx configured with exactly the lines docs/subscriptions.md
gives, and curl as the mail provider's client. Then its limits, straight at the
server: ~1,000 idle half-sent connections, a burst of 300 valid POSTs, no
version banner. Last, the form parser and the app's answers under hypothesis.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from listmilter import web
from listmilter.core import config as config_mod
from listmilter.core import tokens
from listmilter.store import open_store
from listmilter.store import secret as secret_mod
from tests.bed.listmilter import cli
from tests.bed.net import free_port, wait_for_port, wait_until
from tests.bed.sink import Sink

ROOT = Path(__file__).resolve().parent.parent
LIST = "dev@example.org"
CLIENT = "127.0.0.2"        # curl's source address: not the trusted proxy (nginx, 127.0.0.1)
ONE_CLICK = "List-Unsubscribe=One-Click"
# RFC 8058 section 8.3's example body byte for byte (Content-Length: 124), and its
# Content-Type as printed: its delimiter lines are the bare boundary.
RFC_TYPE = "multipart/form-data; boundary=---FormBoundaryjWmhtjORrn"
RFC_BODY = (b"---FormBoundaryjWmhtjORrn\r\n"
            b'Content-Disposition: form-data; name="List-Unsubscribe"\r\n'
            b"\r\n"
            b"One-Click\r\n"
            b"---FormBoundaryjWmhtjORrn--")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Site:
    """A state folder, a config, a sink for the goodbye mails and a running `listmilter web`."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.port = free_port()
        self.nginx_port = free_port()
        self.log = folder / "listmilter.log"
        self.config = folder / "listmilter.yaml"
        self.sink: Sink | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.sink = Sink().start()
        self.config.write_text(
            f"state_dir: {self.dir}/state\n"
            f"store: {{backend: sqlite}}\n"
            f"site: {{admin: admin@example.net}}\n"
            f"log: {{target: {self.log}}}\n"
            f"outgoing: {{smtp: \"127.0.0.1:{self.sink.port}\"}}\n"
            f"web:\n"
            f"  listen: \"127.0.0.1:{self.port}\"\n"
            f"  base_url: \"http://127.0.0.1:{self.nginx_port}\"\n"
            f"  trusted_proxies: [127.0.0.1]\n")
        cli(self.config, "list", "create", LIST)
        self.secret = secret_mod.load_or_create(str(self.dir / "state"))
        # The console script pip installs, as systemd's ExecStart runs it.
        program = Path(sys.executable).parent / "listmilter"
        with open(self.dir / "web.stderr", "ab") as stderr:
            self.proc = subprocess.Popen([str(program), "-c", str(self.config), "web"],
                                         stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for_port(self.port, timeout=20)

    def stop(self) -> None:
        _stop(self.proc)
        if self.sink is not None:
            self.sink.stop()

    # -- the store, as an admin sees it ------------------------------------------
    def add(self, *addresses: str) -> None:
        cli(self.config, "members", "add", LIST, "-", input="\n".join(addresses) + "\n")

    def members(self) -> set[str]:
        return set(cli(self.config, "members", "ls", LIST).stdout.split())

    def last_event(self, address: str) -> list[str]:
        """(action, how, who, detail) of the consent record's last line for `address`."""
        rows = cli(self.config, "members", "history", LIST, address, "--csv").stdout.splitlines()[1:]
        return rows[-1].split(",")[2:6]

    def token(self, address: str) -> str:
        """The link a post to `address` carries: it names their membership (its `added`; 0 for none)."""
        store = open_store(config_mod.load(str(self.config)))
        try:
            member = store.member(LIST, address)
        finally:
            store.close()
        return tokens.unsubscribe_token(self.secret, LIST, address, member.added if member else 0.0)

    # -- the running process -------------------------------------------------------
    def files(self) -> list[str]:
        fds = Path(f"/proc/{self.proc.pid}/fd")
        out = []
        for fd in fds.iterdir():
            try:
                out.append(os.readlink(fd))
            except OSError:      # closed meanwhile
                pass
        return out

    def database_files(self) -> int:
        return sum(1 for f in self.files() if ".sqlite" in f)

    def threads(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # The idle-connection test holds 1,000 sockets in this process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    s = Site(tmp_path_factory.mktemp("web"))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def documented_nginx_lines(upstream_port: int) -> list[str]:
    """The inside of the `server { }` block docs/subscriptions.md gives, less what
    only a public TLS server has (listen 443 ssl, server_name, certificates)."""
    text = (ROOT / "docs" / "subscriptions.md").read_text()
    match = re.search(r"^( +)server \{\n(.*?)^\1\}$", text, re.S | re.M)
    assert match, "no nginx server block in docs/subscriptions.md"
    lines = [line.strip() for line in match.group(2).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("listen ", "server_name ", "ssl_"))]
    upstream = "proxy_pass http://127.0.0.1:8025;"
    assert upstream in kept, f"docs/subscriptions.md no longer proxies with {upstream!r}"
    return [line.replace(upstream, f"proxy_pass http://127.0.0.1:{upstream_port};") for line in kept]


@pytest.fixture(scope="module")
def nginx(site):
    """A private nginx (Debian's package) on a free port in front of `listmilter web`."""
    program = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(program):
        pytest.fail("nginx is not installed: run ./bootstrap (it installs Debian's nginx)")
    folder = site.dir / "nginx"
    folder.mkdir()
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""   # workers drop root
    server = "\n".join(f"        {line}" for line in documented_nginx_lines(site.port))
    (folder / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log info;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{\n"
        f"    access_log {folder}/access.log;\n"
        + "".join(f"    {kind}_temp_path {folder}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"    server {{\n        listen 127.0.0.1:{site.nginx_port};\n{server}\n    }}\n}}\n")
    with open(folder / "stderr", "ab") as stderr:
        proc = subprocess.Popen([program, "-p", str(folder), "-c", str(folder / "nginx.conf"),
                                 "-e", str(folder / "error.log")], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(site.nginx_port, timeout=20)
        yield f"http://127.0.0.1:{site.nginx_port}"
    finally:
        _stop(proc)


def curl(url: str, *args: str, data: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one request made by curl from CLIENT; `data`: the exact bytes to POST."""
    program = shutil.which("curl")
    if not program:
        pytest.fail("curl is not installed: run ./bootstrap (it installs Debian's curl)")
    if data is not None:
        args += ("--data-binary", "@-")
    proc = subprocess.run([program, "-sS", "--interface", CLIENT, "-D", "-", "--max-time", "30", *args, url],
                          input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    head, _, body = proc.stdout.decode("utf-8", "replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post(port: int, path: str, body: bytes, content_type: str = "application/x-www-form-urlencoded",
         timeout: float = 60) -> tuple[int, dict[str, str], str]:
    """One POST straight to `listmilter web` on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


# -- through nginx, as a mail provider's one-click POST arrives ------------------------------
@pytest.mark.parametrize("how", ["curl -d", "curl -F", "RFC 8058 example", "RFC 8058 example, MIME boundary"])
def test_one_click_through_nginx_unsubscribes(site, nginx, how):
    name = re.sub(r"[^a-z0-9]+", "-", how.lower())
    member, bystander = f"{name}@example.net", f"stays-{name}@example.net"
    site.add(member, bystander)
    url = f"{nginx}/u/{site.token(member)}"
    # The page a person opening the link sees: a button, no change.
    status, _, page = curl(url)
    assert status == 200 and 'value="One-Click"' in page and member in site.members()
    # A forged X-Forwarded-For: nginx appends the real peer, which is what gets recorded.
    spoof = ("-H", "X-Forwarded-For: 203.0.113.9")
    if how == "curl -d":
        status, _, page = curl(url, "-d", ONE_CLICK, *spoof)
    elif how == "curl -F":
        status, _, page = curl(url, "-F", ONE_CLICK, *spoof)
    elif how == "RFC 8058 example":
        status, _, page = curl(url, "-H", f"Content-Type: {RFC_TYPE}", *spoof, data=RFC_BODY)
    else:       # the same body with the boundary MIME reads its delimiter lines by
        status, _, page = curl(url, "-H", f"Content-Type: {RFC_TYPE.replace('=---', '=-')}", *spoof,
                               data=RFC_BODY)
    assert status == 200 and "You have been unsubscribed" in page, page
    assert member not in site.members() and bystander in site.members()
    assert site.last_event(member) == ["unsubscribed", "web", CLIENT, "one-click unsubscribe"]
    wait_until(lambda: site.sink.for_recipient(member), 20, what=f"the goodbye mail to {member}")
    assert f"client={CLIENT}, status=unsubscribed (one-click)" in site.log.read_text()
    # Clicked again: still 200 (the provider sees success), nothing changes.
    status, _, page = curl(url, "-d", ONE_CLICK)
    assert status == 200 and "not subscribed" in page


def test_forged_and_tampered_links_are_400_and_logged(site, nginx):
    member = "target@example.net"
    site.add(member)
    token = site.token(member)
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in ("not-a-real-token", tampered):
        for args in ((), ("-d", ONE_CLICK), ("-F", ONE_CLICK)):
            status, _, page = curl(f"{nginx}/u/{bad}", *args)
            assert status == 400 and "not valid" in page
    assert member in site.members()
    assert f"client={CLIENT}, status=refused (forged or damaged unsubscribe link)" \
        in site.log.read_text()
    assert curl(f"{nginx}/elsewhere")[0] == 404          # nginx's `location / { return 404; }`


@pytest.mark.parametrize("content_type, body, why", [
    ("text/plain", ONE_CLICK.encode(), "unsupported content type"),
    ("application/json", b'{"List-Unsubscribe": "One-Click"}', "unsupported content type"),
    ("multipart/form-data", b"--x\r\n\r\nOne-Click\r\n--x--", "multipart without a boundary"),
    ("multipart/form-data; boundary=zz", b"no parts at all", "malformed multipart body"),
    ("multipart/form-data; boundary=caf\xe9", b"--caf\xe9--", "malformed content type"),
])
def test_bodies_that_are_no_one_click_form_are_a_clear_400(site, content_type, body, why):
    member = f"kept-{why.replace(' ', '-')}-{len(body)}@example.net"
    site.add(member)
    status, headers, page = post(site.port, f"/u/{site.token(member)}", body, content_type)
    assert status == 400 and "not a one-click unsubscribe" in page and headers["content-type"].startswith("text/html")
    assert member in site.members()
    assert f"status=refused (not a form: {why})" in site.log.read_text()
    # A well-formed form without the one-click field: 400 as well.
    status, _, _ = post(site.port, f"/u/{site.token(member)}", b"List-Unsubscribe=Yes")
    assert status == 400 and member in site.members()


def test_bodies_over_the_cap_are_413(site, nginx):
    member = "big@example.net"
    site.add(member)
    path = f"/u/{site.token(member)}"
    big = ONE_CLICK.encode() + b"&pad=" + b"x" * web.MAX_BODY
    # Straight at the server: waitress refuses by Content-Length.
    status, _, page = post(site.port, path, big)
    assert status == 413 and "Traceback" not in page
    # Through nginx: its documented client_max_body_size refuses first.
    status, _, _ = curl(f"{nginx}{path}", data=big)
    assert status == 413
    assert member in site.members()


def test_no_version_banner(site, nginx):
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    conn.request("GET", f"/u/{site.token('x@example.net')}")
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("Server") is None, r.getheaders()
    conn.close()
    # waitress's own error pages (a request it cannot parse) carry none either.
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"server:" not in head and b"waitress" not in answer.lower() and b"python" not in answer.lower()
    # Through nginx, only its documented `server_tokens off`: no version.
    _, headers, _ = curl(f"{nginx}/u/{site.token('x@example.net')}")
    assert headers["server"] == "nginx", headers


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


# -- limits, straight at the server --------------------------------------------------------
IDLE = 1000


def test_idle_half_sent_connections_hold_no_thread_and_are_closed_after_the_timeout(site):
    member = "idle-check@example.net"
    site.add(member)
    files_before = len(site.files())
    # Half-sent requests: the request line and some headers, never the end.
    idle = []
    first = time.monotonic()
    try:
        for _ in range(IDLE):
            s = socket.create_connection(("127.0.0.1", site.port), timeout=10)
            s.sendall(b"POST /u/x HTTP/1.1\r\nHost: lists.example.org\r\nContent-Length: 26\r\n")
            idle.append(s)
        opened = time.monotonic()
        wait_until(lambda: len(site.files()) >= files_before + IDLE, 30,
                   what="the server to accept every idle connection")
        # Each costs a descriptor, not a thread: the main loop plus the fixed pool.
        assert site.threads() <= web.THREADS + 1, site.threads()
        # A real click is answered at once meanwhile.
        start = time.monotonic()
        status, _, page = post(site.port, f"/u/{site.token(member)}", ONE_CLICK.encode(), timeout=10)
        took = time.monotonic() - start
        assert status == 200 and "unsubscribed" in page and took < 2, took
        assert member not in site.members()
        # The silent ones are closed once they have been silent CHANNEL_TIMEOUT seconds
        # (each fell silent between `first` and `opened`).
        closed_after = _wait_closed(idle, opened, web.CHANNEL_TIMEOUT + web.CLEANUP_INTERVAL + 20)
        assert len(closed_after) == IDLE, f"{IDLE - len(closed_after)} idle connections still open"
        assert min(closed_after) >= web.CHANNEL_TIMEOUT - (opened - first) - 0.5, min(closed_after)
        assert max(closed_after) <= web.CHANNEL_TIMEOUT + web.CLEANUP_INTERVAL + 5, max(closed_after)
        # And their descriptors are given back.
        wait_until(lambda: len(site.files()) <= files_before + 2, 10, what="the server to close its sockets")
    finally:
        for s in idle:
            s.close()


def _wait_closed(socks: list[socket.socket], since: float, timeout: float) -> list[float]:
    """Seconds after `since` at which the server closed each socket (EOF or reset)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = []
    deadline = time.monotonic() + timeout
    try:
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                except BlockingIOError:
                    continue
                if data == b"":
                    closed.append(time.monotonic() - since)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return closed


BURST = 300


def test_a_burst_of_300_parallel_posts_is_answered_in_full(site):
    members = [f"burst{i}@example.net" for i in range(BURST)]
    site.add(*members)
    barrier = threading.Barrier(BURST)
    results: list = [None] * BURST

    def click(i: int) -> None:
        path = f"/u/{site.token(members[i])}"
        barrier.wait()
        try:
            results[i] = post(site.port, path, ONE_CLICK.encode(), timeout=120)[0]
        except Exception as e:             # a reset or a timeout: what this test is about
            results[i] = repr(e)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(BURST)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    took = time.monotonic() - start
    failures = [r for r in results if r != 200]
    assert not failures, f"{len(failures)} of {BURST} not answered 200 in {took:.1f}s: {failures[:5]}"
    assert not set(members) & site.members()
    assert site.last_event(members[0])[:2] == ["unsubscribed", "web"]
    # No database stays open once the requests are done (the workers outlive them).
    wait_until(lambda: site.database_files() == 0, 10, what="the workers to close their databases")
    assert site.threads() <= web.THREADS + 1


# -- the form parser and the app, under hypothesis ---------------------------------------------
_names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, exclude_characters='"\\'),
                 min_size=1, max_size=20)
_values = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5))
def test_urlencoded_forms_read_back(fields):
    import urllib.parse
    assert web.parse_form("application/x-www-form-urlencoded", urllib.parse.urlencode(fields).encode()) == fields


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, _values, max_size=5),
       st.text(st.sampled_from("abcXYZ0189'()+_,-./:=?"), min_size=1, max_size=40))
@example({"<>": "", "<a>": "x"}, "0")       # email.utils.unquote would strip a name's own <...>
def test_multipart_forms_read_back(fields, boundary):
    encoded = {k: v.encode() for k, v in fields.items()}
    if any(b"--" + boundary.encode() in v for v in encoded.values()):
        return
    body = b"".join(b"--" + boundary.encode() + b"\r\n"
                    + f'Content-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
                    for k, v in encoded.items()) + b"--" + boundary.encode() + b"--\r\n"
    if not fields:
        body = b"--" + boundary.encode() + b"--\r\n"
    got = None
    try:
        got = web.parse_form(f'multipart/form-data; boundary="{boundary}"', body)
    except web.BadForm:
        assert not fields          # only a form without any part is refused
    if fields:
        assert got == fields


_types = st.one_of(
    st.sampled_from(["", "application/x-www-form-urlencoded", "multipart/form-data",
                     "multipart/form-data; boundary=B", "multipart/form-data; boundary=--B",
                     "Multipart/Form-Data; Boundary=\"B\"", "multipart/form-data; boundary*=utf-8''%42",
                     "multipart/form-data; boundary*=utf-8''%0d%0aX", "multipart/form-data; boundary*",
                     "text/plain"]),
    st.text(max_size=60),
    st.text(max_size=40).map(lambda b: "multipart/form-data; boundary=" + b))
_pieces = st.sampled_from([
    b"--B", b"--B--", b"----B", b"B", b"\r\n", b"\n", b"\r", b"Content-Disposition: form-data", b"; name=",
    b'"List-Unsubscribe"', b"name*=utf-8''L%C3%AF", b"name*", b"One-Click", b"Content-Transfer-Encoding: base64",
    b"Content-Type: multipart/mixed; boundary=C", b"--C", b"=?utf-8?b?w68=?=", b"\xff\xfe", b"\x00",
    b"List-Unsubscribe=One-Click", b"&", b"=", b"%", b"%zz", b" ", b"\t", b":", b";", b'"', b"\\"])
_bodies = st.one_of(st.binary(max_size=300), st.lists(_pieces, max_size=40).map(b"".join))


# A parameter name ending in RFC 2231's "*" with no value: the standard library's
# header parser raised IndexError on it (CPython gh-151857), a 500 for any POST.
_STAR_PART = b"--B\r\nContent-Disposition: form-data; name*\r\n\r\nOne-Click\r\n--B--\r\n"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_types, _bodies)
@example("multipart/form-data; boundary*", b"--B--")
@example("multipart/form-data; boundary=B", _STAR_PART)
def test_any_body_gives_a_form_or_badform(content_type, body):
    try:
        form = web.parse_form(content_type, body)
    except web.BadForm as e:
        assert str(e) in ("unsupported content type", "malformed content type",
                          "multipart without a boundary", "malformed multipart body")
        return
    assert isinstance(form, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The WSGI app in this process, on a real store with a list that has no members."""
    from listmilter.app.runtime import Runtime
    folder = tmp_path_factory.mktemp("app")
    config = folder / "listmilter.yaml"
    config.write_text(f"state_dir: {folder}/state\nlog: {{target: {folder}/log}}\n"
                      "web: {base_url: \"https://l.example\"}\n")
    cli(config, "list", "create", LIST)
    runtime = Runtime(str(config))
    try:
        yield web.App(runtime), tokens.unsubscribe_token(runtime.secret, LIST, "gone@example.net", 0.0)
    finally:
        runtime.store.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["POST", "GET", "HEAD", "PUT"]), _types, _bodies,
       st.sampled_from(["valid", "forged", "confirm"]), st.one_of(st.none(), st.text(max_size=8)))
@example("POST", "multipart/form-data; boundary=B", _STAR_PART, "forged", None)
def test_the_app_answers_every_request_without_a_500(app, method, content_type, body, link, length):
    application, token = app
    path = {"valid": f"/u/{token}", "forged": "/u/AAAAAAAAAAAAAAAAAAAAAAAA",
            "confirm": "/confirm/aaaaaaaaaaaaaaaaaaaaaaaa"}[link]
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": "192.0.2.1",
               "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)) if length is None else length,
               "wsgi.input": io.BytesIO(body)}
    got = {}
    out = b"".join(application(environ, lambda status, headers: got.update(status=status)))
    status = int(got["status"].split()[0])
    allowed = {"POST": {200, 400, 404, 413}, "GET": {200, 400, 404}, "HEAD": {200, 400, 404}, "PUT": {405}}
    assert status in allowed[method], (status, out[:300])
    if method == "POST" and link == "valid" and status == 200:
        assert b"not subscribed" in out       # a real one-click: the address was no member


@pytest.mark.parametrize("method, length, status, line", [
    ("PUT", "26", 405, "method=PUT, status=refused (method not allowed)"),
    ("OPTIONS", "0", 405, "method=OPTIONS, status=refused (method not allowed)"),
    ("POST", str(web.MAX_BODY + 1), 413, f"status=refused (body over {web.MAX_BODY} bytes)"),
])
def test_other_refusals_are_logged_too(app, caplog, method, length, status, line):
    application, token = app
    got = {}
    environ = {"REQUEST_METHOD": method, "PATH_INFO": f"/u/{token}", "REMOTE_ADDR": "192.0.2.1",
               "CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(ONE_CLICK.encode())}
    b"".join(application(environ, lambda s, headers: got.update(status=s, headers=dict(headers))))
    assert int(got["status"].split()[0]) == status
    assert f"web: client=192.0.2.1, {line}" in caplog.text
    if status == 405:
        assert got["headers"]["Allow"] == "GET, HEAD, POST"


def test_a_confirmation_whose_mail_cannot_go_out_is_a_503_and_stays_open(tmp_path, caplog):
    """outgoing: down when a confirmation link is pressed: a temporary error (core/errors.py),
    so 503 and a log line, not a 500 with a traceback; the request is open for the retry."""
    from listmilter.app.runtime import Runtime
    from listmilter.store import open_pending
    config = tmp_path / "listmilter.yaml"
    config.write_text(f"state_dir: {tmp_path}/state\nlog: {{target: {tmp_path}/log}}\n"
                      f"outgoing: {{smtp: \"127.0.0.1:{free_port()}\"}}\n"     # nothing listens there
                      "web: {base_url: \"https://l.example\"}\n")
    cli(config, "list", "create", LIST)
    runtime = Runtime(str(config))
    try:
        pending = open_pending(runtime.config)
        try:
            token = pending.create(tokens.CONFIRM, LIST, "new@example.net", "subscribe", 7)
        finally:
            pending.close()
        application = web.App(runtime)

        def request(method: str) -> tuple[int, bytes]:
            got = {}
            environ = {"REQUEST_METHOD": method, "PATH_INFO": f"/confirm/{token}", "REMOTE_ADDR": "192.0.2.1",
                       "CONTENT_LENGTH": "0", "wsgi.input": io.BytesIO(b"")}
            out = b"".join(application(environ, lambda status, headers: got.update(status=status)))
            return int(got["status"].split()[0]), out

        status, out = request("POST")
        assert status == 503 and b"try again later" in out, out
        assert "internal error" not in caplog.text and "Traceback" not in caplog.text
        assert "status=failed (smtp: 127.0.0.1:" in caplog.text
        assert request("GET")[0] == 200              # still a button to press once mail goes out
    finally:
        runtime.store.close()
