"""`listmilter web`: one-click unsubscribe (RFC 8058) and confirmation links.

A small WSGI app on the standard library's server (wsgiref, one thread per
request), meant to sit behind a reverse proxy that terminates TLS
(docs/subscriptions.md). It listens only where `web.listen` says.

    GET  /u/TOKEN        a page with one button (link scanners that prefetch
                         URLs unsubscribe nobody)
    POST /u/TOKEN        body List-Unsubscribe=One-Click: unsubscribe at once
    GET  /confirm/TOKEN  a page with one button
    POST /confirm/TOKEN  confirm the request (subscribe or unsubscribe)

A forged or damaged link answers 400, an unknown list or code 404, a link
whose membership has ended (or of the old format, after web.old_links_until)
410; each is logged. The client address recorded in the consent record is REMOTE_ADDR,
or, when REMOTE_ADDR is one of `web.trusted_proxies`, the last address in
X-Forwarded-For that is not a trusted proxy.
"""

from __future__ import annotations

import html
import ipaddress
import socketserver
import threading
import urllib.parse
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from listmilter.app import subscription_service as service_mod
from listmilter.log import fields, logger
from listmilter.store import StoreError
from listmilter.store import secret as secret_mod

MAX_BODY = 4096

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


class App:
    """The WSGI application. `runtime` gives (config, store) and the secret."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            status, body, extra = self.route(method, path, environ)
        except StoreError as e:
            logger.error("web: %s", fields(path=path, status=f"failed (store: {e})"))
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
            return 405, page("Not allowed", "Use the button on the page."), [("Allow", "GET, POST")]
        service, config = self._service()
        client = client_address(environ, config.web.trusted_proxies)
        try:
            if method == "POST":
                form = self._form(environ)
                if form is None:
                    return 413, page("Too large", "The request is too large."), []
            if kind == "u":
                return self.unsubscribe(service, method, token, client, form if method == "POST" else {})
            return self.confirm(service, method, token, client)
        finally:
            service.close()

    @staticmethod
    def _form(environ: dict) -> dict[str, str] | None:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            return None
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        return dict(urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True))

    def unsubscribe(self, service, method: str, token: str, client: str, form: dict):
        if method != "POST":
            status, found, text = service.check_link(token, client)
            if found is None or status != 200:
                return status, page("Invalid link" if found is None else "Unsubscribe", text), []
            return 200, page(f"Unsubscribe from {found.list}",
                             f"Press the button to stop receiving mail from {found.list}.",
                             f"/u/{token}", "Unsubscribe", {"List-Unsubscribe": "One-Click"}), []
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


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):       # access log in listmilter's log, without tokens
        logger.debug("web: %s", format % args)

    def address_string(self):
        return self.client_address[0]


def serve(runtime, host: str, port: int, ready: threading.Event | None = None):
    """Serve until shutdown() is called on the returned server (from another thread) or SIGTERM."""
    runtime.secret = getattr(runtime, "secret", None) or secret_mod.load_or_create(runtime.config.state_dir)
    server = make_server(host, port, App(runtime), server_class=_Server, handler_class=_Handler)
    logger.info("web: listening on %s:%d, base_url=%s", host, port, runtime.config.web.base_url or "(none)")
    if ready:
        ready.set()
    return server
