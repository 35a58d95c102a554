"""A small authoritative DNS server for the DMARC tests: UDP on 127.0.0.1, one thread.

Zones are {name: [TXT strings]}; a name in `silent` is never answered (the
resolver times out), one in `servfail` gets SERVFAIL; any other name is
NXDOMAIN with an SOA (negative TTL NEGATIVE_TTL).
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 300
NEGATIVE_TTL = 60

# The zones the DMARC tests use (example domains, RFC 2606 .test).
ZONES = {
    "_dmarc.reject.test.": ["v=DMARC1; p=reject; rua=mailto:d@reject.test"],
    "_dmarc.quarantine.test.": ["v=DMARC1;p=quarantine"],
    "_dmarc.none.test.": ["v=DMARC1; p=none"],
    # A subdomain without its own record: the organizational domain's sp= counts.
    "_dmarc.parent.test.": ["v=DMARC1; p=none; sp=reject"],
    "_dmarc.malformed.test.": ["v=DMARC1; p=bogus"],
    # A subdomain's own record that does not parse: no policy, the parent's sp= does not apply.
    "_dmarc.bad.parent.test.": ["v=DMARC1; p=rejected"],
    "_dmarc.other.test.": ["google-site-verification=abc"],     # a TXT record, not DMARC
}
SILENT = {"_dmarc.timeout.test."}


class DnsServer:
    def __init__(self, zones: dict[str, list[str]] | None = None, silent: set[str] | None = None,
                 servfail: set[str] | None = None):
        self.zones = {k.lower(): v for k, v in (ZONES if zones is None else zones).items()}
        self.silent = {s.lower() for s in (SILENT if silent is None else silent)}
        self.servfail = {s.lower() for s in (servfail or set())}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:         # the 0.2 s timeout: look at _stop again
                continue
            try:
                reply = self.answer(dns.message.from_wire(data))
            except Exception:
                continue            # not DNS: no answer, like a real server
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        name = question.name.to_text().lower()
        self.queries.append(name)
        if name in self.silent:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        if name in self.zones and question.rdtype == dns.rdatatype.TXT:
            txts = self.zones[name]
            rrset = dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN, dns.rdatatype.TXT,
                                             ['"' + t.replace('"', '\\"') + '"' for t in txts])
            reply.answer.append(rrset)
            return reply
        zone = dns.name.from_text(".".join(name.split(".")[-2:]) or ".")
        reply.authority.append(dns.rrset.from_text(
            zone, NEGATIVE_TTL, dns.rdataclass.IN, dns.rdatatype.SOA,
            f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {NEGATIVE_TTL}"))
        if not any(n == name or n.endswith("." + name) for n in self.zones):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply


@contextmanager
def dns_server(**kw):
    """A running DnsServer, stopped when the block ends, also on failure."""
    server = DnsServer(**kw).start()
    try:
        yield server
    finally:
        server.stop()
