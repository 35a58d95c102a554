"""Where listmilter looks for its config by default.

Imports nothing heavy: `listmilter deliver` needs it before deciding whether
to load the config at all (listmilter.mta.handoff).
"""

from __future__ import annotations

import os

DEFAULT_PATH = "/etc/listmilter/listmilter.yaml"
DEFAULT_STATE_DIR = "/var/lib/listmilter"


def path_from_environment(cli_path: str | None) -> tuple[str, bool]:
    """(path, explicit): -c wins over LISTMILTER_CONFIG over the default path."""
    if cli_path:
        return cli_path, True
    env = os.environ.get("LISTMILTER_CONFIG")
    if env:
        return env, True
    return DEFAULT_PATH, False
