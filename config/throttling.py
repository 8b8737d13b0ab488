"""The API's per-user throttle.

Its own module, importing no DRF views: DRF imports the throttle classes named in
its settings while `rest_framework.views` is being imported.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from rest_framework.throttling import UserRateThrottle as DrfUserRateThrottle


class UserRateThrottle(DrfUserRateThrottle):
    """DRF's per-user throttle (the `user` rate, a sliding window of exact request
    times), with each user's times kept in a deque in this process.

    DRF keeps them as a list in Django's cache, and the default local-memory cache
    pickles and unpickles that list whole on every request: at the default
    100,000/hour a busy client's list holds tens of thousands of times, which cost
    about a millisecond per request. That cache is per process too, so the limit
    still holds per API process, as before.
    """

    #: Request times per throttle key, oldest first.
    histories: ClassVar[dict[str, deque[float]]] = {}
    #: Above this many keys, those with no request in the window are dropped.
    max_keys = 10_000

    def allow_request(self, request: Any, view: Any) -> bool:
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        self.now = self.timer()
        if key not in self.histories and len(self.histories) >= self.max_keys:
            self._drop_idle()
        history = self.histories.setdefault(key, deque())
        while history and history[0] <= self.now - self.duration:
            history.popleft()
        self.history = history
        if len(history) >= self.num_requests:
            return self.throttle_failure()
        history.append(self.now)
        return True

    def wait(self) -> float | None:
        """Seconds until a request is allowed again (DRF's formula, oldest first)."""
        remaining = (
            self.duration - (self.now - self.history[0])
            if self.history
            else self.duration
        )
        available = self.num_requests - len(self.history) + 1
        if available <= 0:
            return None
        return remaining / float(available)

    def _drop_idle(self) -> None:
        for key, history in list(self.histories.items()):
            if not history or history[-1] <= self.now - self.duration:
                del self.histories[key]
