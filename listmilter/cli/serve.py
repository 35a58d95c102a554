"""The long-running and MTA-run commands: `serve`, `deliver` and `web`."""

from __future__ import annotations

import os
import sys
from os import EX_CONFIG, EX_TEMPFAIL, EX_USAGE

from listmilter import __version__
from listmilter.cli.common import Fail


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="run the milter (and the Postfix socketmap) in the foreground")
    s.add_argument("--socket", help="milter socket, overrides milter.socket")
    s.set_defaults(handler=serve)

    s = sub.add_parser("deliver", help="pipe transport: read one message on stdin")
    s.add_argument("recipient")
    s.add_argument("sender", nargs="?", default=None)
    s.set_defaults(handler=deliver)

    s = sub.add_parser("web", help="run the one-click unsubscribe and confirmation web endpoint (foreground)")
    s.add_argument("--listen", metavar="HOST:PORT", help="overrides web.listen")
    s.set_defaults(handler=web)


def runtime_for(path: str, explicit: bool):
    """The running config and store for `serve` and `web`; Fail (75) if the store cannot open."""
    from listmilter.app.runtime import Runtime
    from listmilter.store import StoreError
    try:
        return Runtime(path, explicit)
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    except OSError as e:    # the state folder, e.g. made by root before the service user ran
        raise Fail(f"state folder: {e}", EX_TEMPFAIL) from None


def serve(args, path: str, explicit: bool) -> int:
    from listmilter.log import logger, setup
    runtime = runtime_for(path, explicit)
    cfg = runtime.config
    setup(cfg.log_target, cfg.log_facility)
    from listmilter.mta import killpoint, milter, socketmap
    if killpoint.AT:
        if killpoint.AT not in killpoint.STAGES:
            print(f"listmilter: LISTMILTER_TEST_KILL_AT must be one of {', '.join(killpoint.STAGES)}",
                  file=sys.stderr)
            return EX_USAGE
        logger.warning("warning: LISTMILTER_TEST_KILL_AT=%s: this serve kills itself at %s (for tests only)",
                       killpoint.AT, killpoint.STAGES[killpoint.AT])
    socket = args.socket or cfg.milter_socket
    try:
        # How long a stop waits for messages in flight; keep systemd's TimeoutStopSec above it.
        grace = float(os.environ.get("LISTMILTER_STOP_GRACE") or 30)
    except ValueError:
        print("listmilter: LISTMILTER_STOP_GRACE must be a number of seconds", file=sys.stderr)
        return EX_USAGE
    try:
        # The hourly bounce work (first run a minute after start); tests shorten it (docs/testing.md).
        periodic = float(os.environ.get("LISTMILTER_PERIODIC_INTERVAL") or 0) or None
    except ValueError:
        print("listmilter: LISTMILTER_PERIODIC_INTERVAL must be a number of seconds", file=sys.stderr)
        return EX_USAGE
    # Signals are taken by threads waiting for them (milter.run), so block
    # them before any thread starts: threads inherit the mask, and one
    # without the block would die of SIGTERM's default action.
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    try:
        table = socketmap.start(runtime, cfg.socketmap_socket)
    except OSError as e:
        print(f"listmilter: cannot listen on socketmap socket {cfg.socketmap_socket}: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    from listmilter.mta import handoff
    try:
        deliveries = handoff.start(runtime)
    except OSError as e:    # `deliver` then works in its own process: slower, still correct
        logger.warning("warning: cannot listen on %s: %s; `listmilter deliver` works without serve",
                       os.path.join(cfg.state_dir, handoff.SOCKET_NAME), e)
        deliveries = None
    logger.info("starting listmilter %s: milter=%s, socketmap=%s, deliver=%s, config=%s, store=%s %s, lists=%d",
                __version__, socket, cfg.socketmap_socket, deliveries.path if deliveries else "(none)",
                cfg.path or "built-in defaults",
                cfg.backend, runtime.store.path,
                len(runtime.store.all_lists()))
    from listmilter.app import bounce_processing, held, reports
    if periodic:
        bounce_processing.start_periodic(runtime, period=periodic, first=periodic)
        held.start_periodic(runtime, period=periodic, first=periodic)
        reports.start_periodic(runtime, period=periodic, first=periodic)
    else:
        bounce_processing.start_periodic(runtime)
        held.start_periodic(runtime)       # decisions by reply the pipe could not carry out; expiry
        reports.start_periodic(runtime)    # weekly reports of the lists with report_weekly: true
    runtime.watch()
    try:
        milter.run(runtime, socket, grace=grace, on_reload=lambda: _reload(runtime))
    except Exception as e:   # libmilter could not open its socket, for one
        logger.error("fatal: milter: %s", e)
        return EX_TEMPFAIL
    finally:
        if deliveries:
            handoff.stop(deliveries)
        socketmap.stop(table)
    logger.info("stopping listmilter")
    return 0


def _reload(runtime) -> None:
    from listmilter.log import logger
    logger.info("reload requested (SIGUSR1): reading %s", runtime.path)
    runtime.reload_now()


def deliver(args, path: str, explicit: bool) -> int:
    from listmilter.log import setup
    from listmilter.mta import deliver
    state: dict = {}

    def runtime():
        # Config problems surface inside deliver.main, which turns them into 75.
        from listmilter.core import config as config_mod
        from listmilter.store import open_store
        cfg = config_mod.load(path, explicit)
        setup(cfg.log_target, cfg.log_facility, "listmilter/deliver")
        state["store"] = open_store(cfg)
        return cfg, state["store"]

    try:
        setup("syslog" if os.path.exists("/dev/log") else "stderr", "mail", "listmilter/deliver")
    except OSError as e:    # $LISTMILTER_LOG names a file the MTA's user may not write
        print(f"listmilter: cannot open the log: {e}; will retry", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        return deliver.main(runtime, args.recipient, args.sender)
    finally:
        if "store" in state:
            state["store"].close()


def web(args, path: str, explicit: bool) -> int:
    import signal

    from listmilter.log import logger, setup
    runtime = runtime_for(path, explicit)
    cfg = runtime.config
    try:
        setup(cfg.log_target, cfg.log_facility, "listmilter/web")
    except OSError as e:
        raise Fail(f"cannot open the log: {e}", EX_TEMPFAIL) from None
    listen = args.listen or cfg.web.listen
    if not listen:
        raise Fail("web.listen is not configured (or give --listen HOST:PORT)", EX_CONFIG)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise Fail(f"--listen must be HOST:PORT (got {listen!r})", EX_USAGE)
    if not cfg.web.base_url:
        logger.warning("web: web.base_url is not configured: posts carry no one-click links")
    from listmilter import web
    try:
        server = web.serve(runtime, host, int(port))
    except OSError as e:
        print(f"listmilter: cannot listen on {listen}: {e}", file=sys.stderr)
        return EX_TEMPFAIL

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()    # returns on SIGTERM/SIGINT once the requests at work are answered (5 s at most)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        runtime.store.close()
    logger.info("web: stopped")
    return 0
