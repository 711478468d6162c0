"""Process-wide patches of pysyncobj 0.3.17, installed once by raft.group.

pysyncobj builds its journal and its TCP connections from module-level
names, so these two fixes cannot live in a subclass:

- the journal factory returns raftmq's LmdbJournal for journal paths that a
  ReplicatedGroup registered (atomic compaction, fsync policy; defect B0);
- TcpConnection.send re-arms POLLOUT when bytes are left unsent, so they
  go out as soon as the socket drains instead of waiting for the next send
  (defect B4: heartbeats queued behind a partial write caused elections).

Setting RAFTMQ_PYSYNCOBJ_FIXES=off disables every raftmq override of
pysyncobj, here and in raft.group, to reproduce the defects in tests; never
use it in production.
"""

from __future__ import annotations

import os
import threading

from pysyncobj import syncobj as _syncobj_module
from pysyncobj import tcp_connection as _tcp_module
from pysyncobj.poller import POLL_EVENT_TYPE

from .journal import LmdbJournal

FIXES_ENABLED = os.environ.get("RAFTMQ_PYSYNCOBJ_FIXES", "on").lower() != "off"

_original_create_journal = _syncobj_module.createJournal
_journal_settings: dict[str, bool] = {}
_journal_lock = threading.Lock()
_installed = False


def register_journal(path: str, sync_each_write: bool) -> None:
    """Make the next SyncObj whose journalFile is `path` use an LmdbJournal."""
    with _journal_lock:
        _journal_settings[path] = sync_each_write


def _create_journal(journal_file):
    with _journal_lock:
        sync_each_write = _journal_settings.get(journal_file)
    if sync_each_write is None:
        return _original_create_journal(journal_file)
    return LmdbJournal(journal_file, sync=sync_each_write)


_original_send = _tcp_module.TcpConnection.send


def _send_and_rearm_pollout(self, message):
    _original_send(self, message)
    if self._TcpConnection__writeBuffer and self._TcpConnection__fileno is not None:
        self._TcpConnection__poller.subscribe(
            self._TcpConnection__fileno,
            self._TcpConnection__processConnection,
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
        )


def install() -> None:
    global _installed
    if _installed or not FIXES_ENABLED:
        return
    _syncobj_module.createJournal = _create_journal
    _tcp_module.TcpConnection.send = _send_and_rearm_pollout
    _installed = True
