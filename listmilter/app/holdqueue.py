"""The MTA's hold queue, where the milter quarantines a held post: one small class per MTA
(config `mta.type`), each listing, releasing and deleting by queue id. app/held.py decides
what to do; these only do it.

Postfix: the hold queue, `postqueue -j` (anyone may read it), `postsuper -H ID` and
`postsuper -d ID hold` (root). Its commands find their instance as postconf does:
$MAIL_CONFIG, else the default config directory.

Sendmail: its quarantine (the control file renamed qf<ID> -> hf<ID>), `sendmail -bp -qQ`,
`sendmail -qQ -qI<ID> -Q` (an empty reason unquarantines) and then a queue run for that id;
Sendmail has no command that deletes a queue entry, so deleting is removing its files, under
the lock Sendmail's own queue runners take (core/sendmail_queue.py reads the listing).

Changing the queue needs root: not root, `sudo -n` runs the command (docs/moderation.md gives
the sudoers lines); Sendmail's files can only be removed as root, so a non-root process
raises QueueError and the decision waits for `listmilter held --run` as root.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass

from listmilter.core import sendmail_queue
from listmilter.core.errors import TemporaryError

PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class QueueError(TemporaryError):
    """The MTA's queue could not be read or changed now."""


@dataclass(frozen=True)
class QueueEntry:
    queue_id: str
    arrival: float
    size: int
    sender: str
    recipients: int


class _Commands:
    def __init__(self, env: dict[str, str] | None = None):
        self.env = {**os.environ, "PATH": PATH, **(env or {})}

    def _run(self, argv: list[str], root: bool = False) -> subprocess.CompletedProcess:
        if root and os.geteuid() != 0:
            argv = ["sudo", "-n", *argv]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise QueueError(f"{argv[0]}: {e}") from None

    @staticmethod
    def _failure(what: str, proc: subprocess.CompletedProcess) -> QueueError:
        return QueueError(f"{what}: {(proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}")


class PostfixQueue(_Commands):
    """Postfix's hold queue, through postqueue and postsuper."""

    def held(self) -> dict[str, QueueEntry]:
        """The messages on the hold queue, by queue id."""
        proc = self._run(["postqueue", "-j"])
        if proc.returncode != 0:
            raise self._failure("postqueue -j", proc)
        out = {}
        for line in proc.stdout.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if item.get("queue_name") != "hold":
                continue
            out[item["queue_id"]] = QueueEntry(item["queue_id"], float(item.get("arrival_time", 0)),
                                               int(item.get("message_size", 0)), item.get("sender", ""),
                                               len(item.get("recipients", [])))
        return out

    def _super(self, *args: str) -> str:
        proc = self._run(["postsuper", *args], root=True)
        if proc.returncode != 0:
            raise self._failure(f"postsuper {' '.join(args)}", proc)
        return proc.stderr

    def release(self, queue_id: str) -> bool:
        """Back to the queue for delivery; False when it is not on the hold queue."""
        return ": released from hold" in self._super("-H", queue_id)

    def delete(self, queue_id: str) -> bool:
        """Deleted from the hold queue; False when it is not there."""
        return ": removed" in self._super("-d", queue_id, "hold")


class SendmailQueue(_Commands):
    """Sendmail's quarantine, through its sendmail program (`mta.sendmail`)."""

    def __init__(self, program: str = "/usr/sbin/sendmail", env: dict[str, str] | None = None):
        super().__init__(env)
        self.program = program

    def _entries(self, *match: str) -> list[sendmail_queue.Entry]:
        # Through sudo when not root: the queue's control files are root's, mode 0600 by default.
        proc = self._run([self.program, "-bp", "-qQ", *match], root=True)
        if proc.returncode != 0:
            raise self._failure(f"{self.program} -bp -qQ", proc)
        return [e for e in sendmail_queue.parse_listing(proc.stdout, time.time()) if e.reason]

    def held(self) -> dict[str, QueueEntry]:
        return {e.queue_id: QueueEntry(e.queue_id, e.arrival, e.size, e.sender, e.recipients)
                for e in self._entries()}

    def _find(self, queue_id: str) -> sendmail_queue.Entry | None:
        if not sendmail_queue.valid_id(queue_id):
            return None
        # -qI matches a substring of the id: a whole id matches only itself.
        return next((e for e in self._entries(f"-qI{queue_id}") if e.queue_id == queue_id), None)

    def release(self, queue_id: str) -> bool:
        """Unquarantined and delivered now; False when it is not in the quarantine."""
        if self._find(queue_id) is None:
            return False
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            proc = self._run([self.program, "-qQ", f"-qI{queue_id}", "-Q"], root=True)
            if proc.returncode != 0:
                raise self._failure(f"{self.program} -qQ -qI{queue_id} -Q", proc)
            if self._find(queue_id) is None:
                break
            # Sendmail passes over an entry another process has locked (exit 0 all the same).
            if time.monotonic() > deadline:
                raise QueueError(f"{queue_id}: still quarantined after {self.program} -Q (locked by another "
                                 "Sendmail process); try again later")
            time.sleep(0.2)
        self._deliver_now(queue_id)
        return True

    def _deliver_now(self, queue_id: str) -> None:
        """A queue run for this id, in the background: a list's post may take a while to deliver, and
        the daemon's own queue runs would deliver it anyway, later (its -q interval)."""
        argv = [self.program, f"-qI{queue_id}"]
        if os.geteuid() != 0:
            argv = ["sudo", "-n", *argv]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        except OSError:
            return
        threading.Thread(target=proc.wait, name=f"sendmail -qI{queue_id}", daemon=True).start()

    def delete(self, queue_id: str) -> bool:
        """Its queue files removed; False when it is not in the quarantine."""
        entry = self._find(queue_id)
        if entry is None:
            return False
        return remove_quarantined(entry.folder, queue_id)


LOCK_WAIT = 5.0       # seconds: the SMTP session that quarantined a post holds its lock until it ends


def _locked(fd: int, wait: float = LOCK_WAIT) -> bool:
    """Both kinds of lock Sendmail may build with (flock, fcntl): taken, or False when held elsewhere
    for longer than `wait` seconds."""
    deadline = time.monotonic() + wait
    for kind in (fcntl.flock, fcntl.lockf):
        while True:
            try:
                kind(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
    return True


def remove_quarantined(folder: str, queue_id: str) -> bool:
    """Remove a quarantined entry's files (hf, df, and a transcript xf if any) from a queue folder,
    holding the control file's lock as Sendmail does while it works on an entry: a queue run that
    has it open now (it can only be one listing or releasing quarantined mail) makes this a
    QueueError, tried again later. The data file goes first, the control file last, as Sendmail's
    own clean-up does: a control file without data is reported by Sendmail, data without one is not."""
    if not sendmail_queue.valid_id(queue_id):
        return False

    def place(kind: str) -> str:
        # With queue subfolders (qf/, df/, xf/: Sendmail's "QUEUE_DIR/qf" layout) each kind has its own.
        sub = os.path.join(folder, "qf" if kind == "hf" else kind)
        return os.path.join(sub if os.path.isdir(sub) else folder, f"{kind}{queue_id}")

    control = place("hf")
    try:
        fd = os.open(control, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False            # released or removed since the listing
    except OSError as e:
        raise QueueError(f"{control}: {e.strerror}" + (" (removing Sendmail's queue files needs root)"
                                                       if e.errno == errno.EACCES else "")) from None
    try:
        if not _locked(fd):
            raise QueueError(f"{control}: locked by a Sendmail queue run; try again later")
        try:
            still = os.path.samestat(os.stat(control, follow_symlinks=False), os.fstat(fd))
        except FileNotFoundError:
            still = False
        if not still:
            return False        # unquarantined (renamed to qf) or removed before the lock was ours
        for kind in ("df", "xf"):
            try:
                os.unlink(place(kind))
            except FileNotFoundError:
                pass
        os.unlink(control)
        return True
    except OSError as e:
        raise QueueError(f"{control}: {e.strerror}") from None
    finally:
        os.close(fd)


def queue_for(config) -> PostfixQueue | SendmailQueue:
    """The hold queue of the MTA listmilter runs under (config `mta.type`)."""
    if config.mta == "sendmail":
        return SendmailQueue(config.sendmail_program)
    return PostfixQueue()
