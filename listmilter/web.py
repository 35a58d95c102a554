"""`listmilter web`: one-click unsubscribe (RFC 8058) and confirmation links.

A small WSGI app on waitress, meant to sit behind a reverse proxy that
terminates TLS (docs/subscriptions.md). It listens only where `web.listen`
says. waitress reads and writes every connection in one event loop and hands
only complete requests to a fixed pool of THREADS workers, so idle or
half-sent connections cost a file descriptor, not a thread; silent ones are
closed after CHANNEL_TIMEOUT seconds, at most CONNECTION_LIMIT are open at
once, and no Server: header names the software.

    GET  /u/TOKEN        a page with one button (link scanners that prefetch
                         URLs unsubscribe nobody)
    POST /u/TOKEN        body List-Unsubscribe=One-Click, urlencoded or
                         multipart/form-data (RFC 8058 3.1): unsubscribe at once
    GET  /confirm/TOKEN  a page with one button
    POST /confirm/TOKEN  confirm the request (subscribe or unsubscribe)

A forged or damaged link answers 400, an unknown list or code 404, a link
whose membership has ended (or of the old format, after web.old_links_until)
410, another method 405, a body over MAX_BODY 413; each is logged. A
temporary error (a busy store, the MTA not taking mail) answers 503. The
client address recorded in the consent record is REMOTE_ADDR, or, when
REMOTE_ADDR is one of `web.trusted_proxies`, the last address in
X-Forwarded-For that is not a trusted proxy.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import email.utils
import html
import ipaddress
import logging
import resource
import urllib.parse

import waitress.server

from listmilter.app import subscription_service as service_mod
from listmilter.core.errors import TemporaryError
from listmilter.log import fields, logger
from listmilter.store import site_secret

# The server's limits (docs/subscriptions.md, "The web server").
THREADS = 4                 # requests worked on at once; SQLite serialises the writes anyway
CONNECTION_LIMIT = 2000     # open connections; further ones wait in the kernel's listen queue
CHANNEL_TIMEOUT = 15        # seconds a connection may stay silent (idle or half-sent)
CLEANUP_INTERVAL = 5        # how often silent connections are looked for
MAX_HEADER = 16 * 1024      # request line and headers
MAX_BODY = 4096             # a one-click form is 26 bytes urlencoded, ~200 as multipart
SPARE_FILES = 64            # descriptors besides connections: databases, log, listening socket

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em}}
button{{font-size:1.1em;padding:.5em 1.2em}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def client_address(environ: dict, trusted: tuple[str, ...]) -> str:
    remote = environ.get("REMOTE_ADDR", "") or "unknown"
    if remote not in trusted:
        return remote
    chain = [a.strip() for a in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
    for address in reversed(chain):
        try:
            # An IPv6 zone ("fe80::1%TEXT") is garbage too: ip_address() takes any TEXT
            # there, and it would go into the consent record as the client.
            if "%" in address:
                raise ValueError(address)
            ipaddress.ip_address(address)
        except ValueError:
            return remote          # garbage from the proxy chain: trust nothing after it
        if address not in trusted:
            return address
    return remote


def page(title: str, text: str, form_action: str | None = None, button: str = "",
         hidden: dict[str, str] | None = None) -> bytes:
    body = f"<p>{html.escape(text)}</p>"
    if form_action is not None:
        fields_html = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                              for k, v in (hidden or {}).items())
        body += (f'<form method="post" action="{html.escape(form_action)}">{fields_html}'
                 f'<button type="submit">{html.escape(button)}</button></form>')
    return _PAGE.format(title=html.escape(title), body=body).encode()


class BadForm(ValueError):
    """A POST body that is no form we read; the text says why (and quotes nothing from it)."""


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a POST body: application/x-www-form-urlencoded (also assumed
    without a Content-Type) or multipart/form-data, the two RFC 8058 allows. A
    repeated field keeps its last value. Raises BadForm for anything else."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("", "application/x-www-form-urlencoded"):
        return dict(urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True))
    if media != "multipart/form-data":
        raise BadForm("unsupported content type")
    if not content_type.isascii() or not content_type.isprintable():
        raise BadForm("malformed content type")
    try:
        return _multipart(content_type, body)
    except BadForm:
        raise
    except Exception as e:
        # The standard library's header parser is not total: a parameter name that ends
        # in RFC 2231's "*" with no value ("boundary*", "name*") raises IndexError
        # (CPython gh-151857). Whatever it raises on a body of MAX_BODY bytes is a
        # form we cannot read, not our error.
        raise BadForm("malformed multipart body") from e


def _multipart(content_type: str, body: bytes, retry: bool = True) -> dict[str, str]:
    # The standard library's MIME parser: a form is a MIME multipart (RFC 7578),
    # the body is at most MAX_BODY bytes, and this parser records most bad input
    # as defects (parse_form refuses what it raises on), so it needs no extra
    # dependency. HTTP's policy gives str headers even for 8-bit bytes.
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    boundary = msg.get_boundary()
    if not boundary:
        raise BadForm("multipart without a boundary")
    parts = msg.get_payload()
    if not isinstance(parts, list) or not parts:
        # RFC 8058's own example (section 8.3) writes its delimiter lines as the
        # bare boundary, without the "--" that MIME puts before it (RFC 2046
        # 5.1.1), so a client copied from it finds no part: read such a body
        # as its authors meant.
        if retry and boundary.startswith("--") and boundary.isprintable() and not {'"', "\\"} & set(boundary):
            return _multipart(f'multipart/form-data; boundary="{boundary[2:]}"', body, retry=False)
        raise BadForm("malformed multipart body")
    form = {}
    for part in parts:
        if not isinstance(part, email.message.Message):
            continue
        name = part.get_param("name", header="content-disposition")
        value = part.get_payload(decode=True)
        if not isinstance(name, (str, tuple)) or not isinstance(value, bytes):   # no name, or nested
            continue
        # get_param unquoted a plain name already; collapse_rfc2231_value would also strip
        # a name's own <...> (email.utils.unquote), so it is only for RFC 2231 (charset) names.
        key = name if isinstance(name, str) else email.utils.collapse_rfc2231_value(name)
        form[key] = value.decode("utf-8", "replace")
    return form


class App:
    """The WSGI application. `runtime` gives (config, store) and the secret."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            status, body, extra = self.route(method, path, environ)
        except TemporaryError as e:
            # A busy store, or outgoing not taking a confirmation's welcome or goodbye
            # (apply() leaves the request open for the retry): core/errors.py's temporary.
            logger.error("web: %s", fields(path=path, status=f"failed ({e})"))
            status, body, extra = 503, page("Try again later", "The service is busy; please try again later."), []
        except Exception:
            logger.exception("web: internal error for %s %s", method, path)
            status, body, extra = 500, page("Error", "Something went wrong; please try again later."), []
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 410: "Gone",
                  413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}[status]
        start_response(f"{status} {reason}", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(body))),
                                               ("Cache-Control", "no-store"),
                                               ("X-Content-Type-Options", "nosniff"),
                                               ("Referrer-Policy", "no-referrer"), *extra])
        return [b""] if method == "HEAD" else [body]

    def _service(self):
        # Requests are few: look at the config file's mtime on each one, so a list
        # made a moment ago is known (the milter checks at most once a second).
        self.runtime._next_check = 0
        config, store = self.runtime.current()
        return service_mod.Service(config, store, self.runtime.secret), config

    def route(self, method: str, path: str, environ: dict):
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("u", "confirm"):
            return 404, page("Not found", "There is nothing here."), []
        kind, token = parts
        if method not in ("GET", "HEAD", "POST"):
            # Refused before the store is opened: the client from the config in use.
            client = client_address(environ, self.runtime.config.web.trusted_proxies)
            logger.warning("web: %s", fields(client=client, method=method, status="refused (method not allowed)"))
            return 405, page("Not allowed", "Use the button on the page."), [("Allow", "GET, HEAD, POST")]
        service, config = self._service()
        client = client_address(environ, config.web.trusted_proxies)
        try:
            body = b""
            if method == "POST":
                read = self._body(environ)
                if read is None:
                    logger.warning("web: %s", fields(client=client, status=f"refused (body over {MAX_BODY} bytes)"))
                    return 413, page("Too large", "The request is too large."), []
                body = read
            if kind == "u":
                return self.unsubscribe(service, method, token, client, environ.get("CONTENT_TYPE", ""), body)
            return self.confirm(service, method, token, client)
        finally:
            try:
                service.close()
            finally:
                # Worker threads outlive requests: keep no database open between them.
                service.store.release()

    @staticmethod
    def _body(environ: dict) -> bytes | None:
        """The request body, or None when it is over MAX_BODY."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            return None
        return environ["wsgi.input"].read(length) if length > 0 else b""

    def unsubscribe(self, service, method: str, token: str, client: str, content_type: str, body: bytes):
        if method != "POST":
            status, found, text = service.check_link(token, client)
            if found is None or status != 200:
                return status, page("Invalid link" if found is None else "Unsubscribe", text), []
            return 200, page(f"Unsubscribe from {found.list}",
                             f"Press the button to stop receiving mail from {found.list}.",
                             f"/u/{token}", "Unsubscribe", {"List-Unsubscribe": "One-Click"}), []
        try:
            form = parse_form(content_type, body)
        except BadForm as e:
            logger.warning("web: %s", fields(client=client, status=f"refused (not a form: {e})"))
            return 400, page("Bad request", "This request is not a one-click unsubscribe."), []
        if form.get("List-Unsubscribe") != "One-Click":
            logger.warning("web: %s", fields(client=client, status="refused (POST without List-Unsubscribe=One-Click)"))
            return 400, page("Bad request", "This request is not a one-click unsubscribe."), []
        status, list_address, text = service.one_click(token, client)
        return status, page("Unsubscribe", text), []

    def confirm(self, service, method: str, token: str, client: str):
        if method != "POST":
            pending = service.confirm_info(token)
            if pending is None:
                logger.warning("web: %s", fields(client=client, method=method,
                                                 status="refused (confirmation link unknown, used or expired)"))
                return 404, page("Not valid", "This confirmation link is unknown, used or expired."), []
            verb = "join" if pending.action == "subscribe" else "leave"
            return 200, page(f"Confirm: {verb} {pending.list}",
                             f"Press the button to {verb} the mailing list {pending.list}.",
                             f"/confirm/{token}", f"Yes, {verb} {pending.list}"), []
        status, text = service.web_confirm(token, client)
        return status, page("Confirmation" if status == 200 else "Not confirmed", text), []


class _WaitressLog(logging.Handler):
    """waitress's own lines (connection limit reached, ...) in listmilter's log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger.log(record.levelno, "web: %s", record.getMessage(), exc_info=record.exc_info)
        except Exception:
            self.handleError(record)


def connection_limit(wanted: int = CONNECTION_LIMIT) -> int:
    """CONNECTION_LIMIT, or fewer if the open-file limit cannot be raised to fit it: a
    server out of descriptors cannot accept, and would spin on the waiting connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        try:
            soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    limit = max(soft - SPARE_FILES, 16)
    logger.warning("web: open-file limit %d allows %d connections, not %d (raise LimitNOFILE=)",
                   soft, limit, wanted)
    return limit


def serve(runtime, host: str, port: int):
    """A bound waitress server: run() serves until SIGINT/SIGTERM (a KeyboardInterrupt)."""
    runtime.secret = getattr(runtime, "secret", None) or site_secret(runtime.config)
    own = logging.getLogger("waitress")
    if not any(isinstance(h, _WaitressLog) for h in own.handlers):
        own.addHandler(_WaitressLog())
    own.setLevel(logging.INFO)
    own.propagate = False
    # "Task queue depth is N" comes for every request that waits for a worker: a burst
    # would fill the log with it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    limit = connection_limit()
    # This thread only runs the event loop: close what opening the store at start opened,
    # so that no database stays open between requests.
    runtime.store.release()
    server = waitress.server.create_server(
        App(runtime), host=host, port=port, threads=THREADS, connection_limit=limit,
        channel_timeout=CHANNEL_TIMEOUT, cleanup_interval=CLEANUP_INTERVAL,
        max_request_header_size=MAX_HEADER, max_request_body_size=MAX_BODY,
        asyncore_use_poll=True,                # select() stops at descriptor 1024
        ident="",                              # no Server: header
        clear_untrusted_proxy_headers=False,   # X-Forwarded-For is judged by client_address()
        log_socket_errors=False, expose_tracebacks=False)
    logger.info("web: listening on %s:%d, base_url=%s, threads=%d, connection_limit=%d, timeout=%ds",
                host, port, runtime.config.web.base_url or "(none)", THREADS, limit, CHANNEL_TIMEOUT)
    return server
