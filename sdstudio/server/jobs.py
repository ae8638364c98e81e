"""Jobs with ids and explicit states, kept in SQLite apart from the HTTP routes.

States: pending -> running -> done / failed / canceled; a pending job may go straight to canceled.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("sdstudio.server")

JobState = Literal["pending", "running", "done", "failed", "canceled"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "canceled"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    result TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT
)
"""
# added after the first release: a store made before it gets the column at open
MIGRATIONS = ("ALTER TABLE jobs ADD COLUMN worker TEXT",)


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: JobState
    request: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    error: str | None
    result: dict[str, Any] | None
    attempts: int
    worker: str | None = None  # the worker that ran it last (its name, as "worker-0")


class JobStore:
    """One SQLite file; every method is one short transaction, safe to call from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a commit survives the server's death (kill -9), only a power loss or OS
        # crash may undo the last ones (a job then runs again). FULL's fsync per commit cost ~4 ms each, three
        # commits per job, on this project's benchmark machine (benchmarks/api_overhead.py)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "worker" not in columns:
            self._db.execute(MIGRATIONS[0])
        # notified whenever a job reaches a final state, so that a waiter wakes at once, not on a poll
        self._ended = threading.Condition()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, row: tuple) -> Job:
        id_, kind, state, request, created, started, finished, error, result, attempts, worker = row
        return Job(
            id_, kind, state, json.loads(request), created, started, finished, error,
            json.loads(result) if result else None, attempts, worker,
        )  # fmt: skip

    _COLS = "id, kind, state, request, created, started, finished, error, result, attempts, worker"

    def submit(self, kind: str, request: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, request, created) VALUES (?, ?, 'pending', ?, ?)",
                (job_id, kind, json.dumps(request), time.time()),
            )
        return job_id

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def position(self, job_id: str) -> int | None:
        """0-based place among pending jobs (None unless pending)."""
        with self._lock:
            row = self._db.execute("SELECT seq, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1] != "pending":
                return None
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND seq < ?", (row[0],)
            ).fetchone()
        return ahead

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()[0]

    def claim_next(self, worker: str | None = None) -> Job | None:
        """The oldest pending job, now marked running by ``worker`` (one transaction holding SQLite's write
        lock from the read to the update, so two workers, threads or processes, never claim one job)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT {self._COLS} FROM jobs WHERE state = 'pending' ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, worker = ? "
                        "WHERE id = ? AND state = 'pending'",
                        (time.time(), worker, row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        return self.get(row[0])

    def _finish(self, job_id: str, state: JobState, error: str | None, result: dict | None) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ?, result = ? WHERE id = ? AND state = 'running'",
                (state, time.time(), error, json.dumps(result) if result is not None else None, job_id),
            )
        self._notify_ended()
        return cur.rowcount == 1

    def _notify_ended(self) -> None:
        with self._ended:
            self._ended.notify_all()

    def wait(self, job_id: str, timeout: float | None = None, recheck_s: float = 1.0) -> Job | None:
        """The job once it is in a final state (None if there is no such job, or at ``timeout``); wakes
        when a job of this store ends. ``recheck_s`` bounds each sleep, for a job another process ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._ended:  # checked under the condition: an end between the check and the wait wakes it
                job = self.get(job_id)
                if job is None or job.state in FINAL_STATES:
                    return job
                left = recheck_s if deadline is None else min(recheck_s, deadline - time.monotonic())
                if left <= 0:
                    return None
                self._ended.wait(left)

    def complete(self, job_id: str, result: dict[str, Any]) -> bool:
        return self._finish(job_id, "done", None, result)

    def fail(self, job_id: str, error: str) -> bool:
        return self._finish(job_id, "failed", error, None)

    def mark_canceled(self, job_id: str) -> bool:
        """A running job the worker stopped on request."""
        return self._finish(job_id, "canceled", "canceled", None)

    def cancel_pending(self, job_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = 'canceled', finished = ?, error = 'canceled' WHERE id = ? AND state = 'pending'",
                (time.time(), job_id),
            )
        self._notify_ended()
        return cur.rowcount == 1

    def history(self, query: str = "", limit: int = 50, before: float | None = None) -> list[Job]:
        """Ended jobs, the last to end first: ``query`` a case-insensitive part of the prompt (empty: all),
        ``before`` only jobs that ended before that time (the next page after a page's last job)."""
        sql = f"SELECT {self._COLS} FROM jobs WHERE state IN ('done', 'failed', 'canceled')"
        args: list[Any] = []
        if query:
            sql += " AND instr(lower(coalesce(json_extract(request, '$.prompt'), '')), lower(?)) > 0"
            args.append(query)
        if before is not None:
            sql += " AND finished < ?"
            args.append(before)
        sql += " ORDER BY finished DESC, seq DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._row(row) for row in rows]

    def delete(self, job_id: str) -> bool:
        """Removes an ended job from the store (False: no such job, or it has not ended)."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM jobs WHERE id = ? AND state IN ('done', 'failed', 'canceled')", (job_id,)
            )
        return cur.rowcount == 1

    def recover(self, max_attempts: int = 2) -> int:
        """At start-up: jobs a killed server left running run again once; a second death fails them."""
        with self._lock:
            failed = self._db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = 'server stopped while running (twice)' "
                "WHERE state = 'running' AND attempts >= ?",
                (time.time(), max_attempts),
            ).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET state = 'pending', started = NULL WHERE state = 'running'"
            ).rowcount
        if failed:
            log.warning("%d job(s) failed: the server stopped twice while running them", failed)
        return requeued
