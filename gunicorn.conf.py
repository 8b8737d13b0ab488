"""gunicorn settings for the API. gunicorn reads ./gunicorn.conf.py by default, so
`gunicorn config.wsgi` from the repository root uses them; command-line options win.

Each worker freezes what loading the app allocated (about 170,000 objects: Django,
DRF, the models, the plugins) out of the garbage collector's reach once the app is
loaded (`gc.freeze()`). Without it, every full collection scans them all: a pause
of up to ~100 ms in the middle of a request, which is what the API's latency tail
was made of (bench/api.py); with it, the largest collection pause is ~2 ms.
"""

from __future__ import annotations

import gc
import os
from typing import Any

workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))


def post_worker_init(worker: Any) -> None:
    """Freeze the loaded app's objects before the worker serves its first request."""
    gc.collect()
    gc.freeze()
