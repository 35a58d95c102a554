"""listmilter: a mailing-list server that lives inside the MTA, as a milter."""

__version__ = "0.1.0"
