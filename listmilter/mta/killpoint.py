"""For tests only: make `serve` die by SIGKILL at a named point (docs/reliability.md).

Some points a test cannot reach from outside: Postfix sends a milter the
headers, body and end of message only after the client's final ".", and a
hand-off is over in milliseconds. With LISTMILTER_TEST_KILL_AT=STAGE in its
environment, serve kills itself with SIGKILL when a message reaches STAGE,
exactly as `kill -9` at that moment would. The variable is read once, when
serve imports this module; unset (production), `reached` compares two strings.
"""

from __future__ import annotations

import os
import signal

STAGES = {
    "header": "the milter got the first header",
    "body": "the milter got the first piece of the body",
    "eom": "end of message, before anything is re-submitted or edited",
    "eom-edited": "end of message, recipient and header edits sent, before the final reply",
    "handoff": "serve has the whole handed-off message, before working on it",
    "handoff-done": "serve did the hand-off's work, before answering `deliver`",
}

AT = os.environ.get("LISTMILTER_TEST_KILL_AT", "")


def reached(stage: str) -> None:
    if stage == AT:
        os.kill(os.getpid(), signal.SIGKILL)
