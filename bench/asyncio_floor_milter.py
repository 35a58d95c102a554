"""A floor without libmilter: the milter protocol (version 6) spoken directly, in one asyncio
event loop, doing what bench/floor_milter.py does for mail to no list: CONTINUE to MAIL and
RCPT, ACCEPT at DATA. What a milter could cost non-list mail if it did not pay libmilter's
thread, poll and hand-off per command (run_nonlist.py measures it beside the others).

    python bench/asyncio_floor_milter.py --port PORT

Only a benchmark: it answers every message the same way and never changes one.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

# Protocol flags (libmilter's mfdef.h): the steps this milter does not want, and those it
# does not answer, as pymilter negotiates them for floor_milter.py's callbacks.
NOHELO, NR_HDR, NOUNKNOWN, NR_CONN = 0x2, 0x80, 0x100, 0x1000
WANTED = NOHELO | NR_HDR | NOUNKNOWN | NR_CONN
CONTINUE, ACCEPT = b"c", b"a"
# Commands answered with CONTINUE, and those with ACCEPT (DATA: no list here; EOM for safety).
ANSWER = {b"M": CONTINUE, b"R": CONTINUE, b"H": CONTINUE, b"N": CONTINUE, b"B": CONTINUE,
          b"U": CONTINUE, b"T": ACCEPT, b"E": ACCEPT}


def packet(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    flags = 0
    try:
        while True:
            size = struct.unpack("!I", await reader.readexactly(4))[0]
            data = await reader.readexactly(size)
            command = data[:1]
            if command == b"O":
                _, _, offered = struct.unpack("!III", data[1:13])
                flags = offered & WANTED
                writer.write(packet(b"O" + struct.pack("!III", 6, 0, flags)))
            elif command == b"C":
                if not flags & NR_CONN:
                    writer.write(packet(CONTINUE))
            elif command == b"L":
                if not flags & NR_HDR:
                    writer.write(packet(CONTINUE))
            elif command in ANSWER:
                writer.write(packet(ANSWER[command]))
            elif command == b"Q":
                break
            # D (macros), A (abort), K (quit, new connection): no answer.
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(session, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    asyncio.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
