"""The least a pymilter milter can be: the callbacks listmilter has for mail to people
(connect without a reply, MAIL, RCPT, DATA that accepts), no work in them.

    python bench/bare_milter.py inet:PORT@127.0.0.1

run_nonlist.py runs it beside listmilter as the floor of what any milter written with
pymilter (libmilter's thread per connection, a Python call per protocol step) costs.
"""

from __future__ import annotations

import sys

import Milter


class Bare(Milter.Base):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        return Milter.CONTINUE

    def data(self):
        return Milter.ACCEPT


if __name__ == "__main__":
    Milter.factory = Bare
    Milter.runmilter("bare", sys.argv[1], 600)
