"""The DMARC lookup for a From domain: DNS at the edge, the decision in listmilter.core.dmarc.

One lookup per post at end of message, within TIMEOUT seconds for all its
queries, so the milter answers Postfix well inside milter_content_timeout.
Answers are cached per name for their TTL (no record: for the negative TTL
of the zone's SOA), in a bounded cache. A lookup that fails (timeout,
SERVFAIL, no resolver) is the safe side: the post is mitigated, never
refused or delayed; the failure is cached briefly so a dead resolver does
not cost every post the whole timeout.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from listmilter.core import dmarc

TIMEOUT = 2.0           # seconds, all queries of one post together
CACHE_SIZE = 10_000     # names kept; the least recently used goes first
MAX_TTL = 86_400        # a record's TTL is believed up to a day
NEGATIVE_TTL = 300      # no record, and the zone's SOA gave no negative TTL
FAILED_TTL = 30         # a failed lookup is tried again after this many seconds


class _Failed(Exception):
    pass


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: the SOA's TTL, at most its MINIMUM field."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return int(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


class Lookup:
    def __init__(self, nameservers: tuple[tuple[str, int], ...] = (), timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, cache_size: int = CACHE_SIZE):
        self.nameservers, self.timeout, self.clock, self.cache_size = nameservers, timeout, clock, cache_size
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...] | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._resolver: dns.resolver.Resolver | None = None
        self.queries = 0        # DNS queries sent (the tests count them)

    def resolver(self) -> dns.resolver.Resolver:
        if self._resolver is None:
            if self.nameservers:
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers]
            else:
                r = dns.resolver.Resolver()     # /etc/resolv.conf; raises if there is none
            r.cache = None                      # ours below, with the failure rule
            self._resolver = r
        return self._resolver

    def _cached(self, name: str) -> tuple[bool, tuple[str, ...] | None]:
        with self._lock:
            entry = self._cache.get(name)
            if entry is None or entry[0] <= self.clock():
                return False, None
            self._cache.move_to_end(name)
            return True, entry[1]

    def _store(self, name: str, ttl: float, value: tuple[str, ...] | None) -> None:
        with self._lock:
            self._cache[name] = (self.clock() + max(0.0, min(ttl, MAX_TTL)), value)
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def txt(self, name: str, deadline: float) -> tuple[str, ...]:
        """The TXT strings at `name` (empty: none); _Failed when DNS gave no answer."""
        hit, value = self._cached(name)
        if hit:
            if value is None:
                raise _Failed(f"{name}: DNS lookup failed recently")
            return value
        left = deadline - self.clock()
        if left <= 0:
            raise _Failed(f"{name}: no time left for the lookup ({self.timeout:g}s)")
        try:
            self.queries += 1
            answer = self.resolver().resolve(name, "TXT", lifetime=left, raise_on_no_answer=False,
                                             search=False)
            if answer.rrset is None:
                self._store(name, _negative_ttl(answer.response), ())
                return ()
            txts = tuple(b"".join(r.strings).decode("ascii", "replace") for r in answer.rrset)
            self._store(name, answer.rrset.ttl, txts)
            return txts
        except dns.resolver.NXDOMAIN as e:
            responses = e.responses()
            self._store(name, _negative_ttl(next(iter(responses.values()), None)), ())
            return ()
        except (dns.exception.DNSException, OSError) as e:
            # Timeout, SERVFAIL from every server (NoNameservers), no resolv.conf, a socket error.
            self._store(name, FAILED_TTL, None)
            raise _Failed(f"{name}: DNS lookup failed ({e.__class__.__name__}: {e})") from None

    def verdict(self, who: dmarc.Poster) -> dmarc.Verdict:
        """The DMARC policy for the post's From; never raises."""
        if who.domain is None:
            return dmarc.Verdict(dmarc.UNKNOWN, who.reason or "no From domain")
        deadline = self.clock() + self.timeout
        org = organizational_domain(who.domain)
        try:
            own = self.txt(f"_dmarc.{who.domain}", deadline)
            org_txts: tuple[str, ...] = ()
            if org != who.domain and not dmarc.has_record(own):
                org_txts = self.txt(f"_dmarc.{org}", deadline)
        except _Failed as e:
            return dmarc.Verdict(dmarc.UNKNOWN, str(e))
        except Exception as e:      # never a lost post over a lookup
            return dmarc.Verdict(dmarc.UNKNOWN, f"DMARC lookup failed ({e.__class__.__name__}: {e})")
        return dmarc.choose(who.domain, org, own, org_txts)


_psl = None
_psl_lock = threading.Lock()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2 through the Public Suffix List (the copy the publicsuffixlist package ships)."""
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList
            _psl = PublicSuffixList()
    return _psl.privatesuffix(domain) or domain


_lookups: dict[tuple[tuple[str, int], ...], Lookup] = {}
_lookups_lock = threading.Lock()


def for_nameservers(nameservers: tuple[tuple[str, int], ...]) -> Lookup:
    """One Lookup (and cache) per configured dns.nameservers, shared by the milter's threads."""
    with _lookups_lock:
        if nameservers not in _lookups:
            _lookups[nameservers] = Lookup(nameservers)
        return _lookups[nameservers]


def post_verdict(nameservers: tuple[tuple[str, int], ...],
                 message_headers: Sequence[tuple[str, str]]) -> dmarc.Verdict:
    """The policy of a post's From domain. Never raises: a lookup is never a reason to refuse,
    hold up or lose a post, and a failure is the safe side (UNKNOWN: mitigate)."""
    try:
        return for_nameservers(nameservers).verdict(dmarc.poster(message_headers))
    except Exception as e:
        return dmarc.Verdict(dmarc.UNKNOWN, f"DMARC lookup failed ({e.__class__.__name__}: {e})")
