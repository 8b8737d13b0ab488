"""Django's PostgreSQL backend, whose per-request health check costs no round trip
while nothing has arrived on the connection's socket.

With `CONN_HEALTH_CHECKS`, Django checks a kept connection before a request's
first query by sending `SELECT 1`: one round trip per request, about a twentieth
of a run request's CPU (bench/api_profile.py). A connection that is idle between
transactions has nothing to read: the server answered everything it was asked.
When the server ends the session (a restart, `pg_terminate_backend`, an idle
timeout) it sends the reason and closes the socket, which makes the socket
readable. So the check polls the socket without waiting, and sends `SELECT 1`
only when something is there (or the session is not idle); that query then fails
on a closed session, and Django opens a new connection, as before. A peer that
vanished without closing (a crashed host) is found by neither check before the
first query times out.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg import pq


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        connection = self.connection
        if connection is None or connection.closed:
            return False
        if connection.info.transaction_status == pq.TransactionStatus.IDLE:
            try:
                readable, _, _ = select.select([connection.fileno()], [], [], 0)
            except (OSError, ValueError):
                return False
            if not readable:
                return True
        return super().is_usable()
