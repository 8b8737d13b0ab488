"""Verified downloads from the File Processing Service.

A file is fetched through the SSRF guard (the URL's host is resolved once, checked,
and the connection goes to the checked address; every redirect hop is checked
again), streamed to a temporary file in bounded memory, and moved into the local
cache (named by its file id and SHA-256) only once its byte size and SHA-256 equal
what the event announced. Nothing is parsed before that. Pure Python (no Django).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from connectors.base import ConnectorContext
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.ssrf import pin_url

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
#: Bytes read from the socket (and written to disk) per step.
PART_BYTES = 64 * 1024
USER_AGENT = "data-integration-service/file_processing"
#: Cached files not used for this long are removed by the next download.
CACHE_TTL_SECONDS = 3600


@dataclass(frozen=True)
class FileEvent:
    """What the File Processing Service announces about one processed file."""

    file_id: str
    url: str
    content_type: str | None
    size: int
    sha256: str


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, for same-origin comparisons."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return (
        scheme,
        (parts.hostname or "").lower(),
        parts.port
        or {
            "http": 80,
            "https": 443,
        }.get(scheme),
    )


def default_cache_dir() -> Path:
    """Where verified files are kept when the config names no `cache_dir`."""
    return Path(tempfile.gettempdir()) / f"dis-file-processing-{os.getuid()}"


class Downloader:
    """Fetches announced files for one connector (its base URL, auth and limits).

    Args:
        config: the connector's loaded config (see `FileProcessingConfig`).
        context: the run-time context (SSRF allow-list, correlation id).
    """

    def __init__(self, config: dict[str, Any], context: ConnectorContext) -> None:
        self.config = config
        self.context = context
        self.base_url: str = config["base_url"]
        self.timeout = float(config.get("timeout_seconds", 30.0))
        self.deadline_seconds = float(config.get("download_deadline_seconds", 3600.0))
        self.max_bytes = int(config.get("max_file_bytes", 5 * 1024**3))
        # trust_env=False: no proxy from the environment may carry a request past
        # the SSRF guard; redirects are followed (and checked) by hand.
        self.http = httpx.Client(
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def absolute_url(self, url: str) -> str:
        """The event's URL joined to `base_url`; another origin only when allowed.

        Raises:
            ConfigError: an absolute URL on another origin without
                `allow_other_hosts`, or a scheme other than http(s).
        """
        if not url.startswith(("http://", "https://")):
            if "://" in url:
                raise ConfigError("the file URL must be http(s) or a relative path")
            return self.base_url.rstrip("/") + "/" + url.lstrip("/")
        if origin(url) != origin(self.base_url) and not self.config.get(
            "allow_other_hosts"
        ):
            raise ConfigError(
                f"the file URL's host {urlsplit(url).hostname!r} is not the "
                "service's (set allow_other_hosts to accept it)"
            )
        return url

    def _auth_headers(self) -> dict[str, str]:
        kind = self.config.get("auth_type", "none")
        if kind == "bearer":
            return {"Authorization": f"Bearer {self.config['token']}"}
        if kind == "api_key":
            return {
                self.config.get("api_key_header", "X-API-Key"): self.config["api_key"]
            }
        return {}

    def _headers(self, url: str) -> dict[str, str]:
        headers = {
            "User-Agent": USER_AGENT,
            # The announced size and checksum are those of the bytes as stored:
            # no transfer compression that httpx would undo.
            "Accept-Encoding": "identity",
        }
        if self.context.correlation_id:
            headers["X-Correlation-ID"] = self.context.correlation_id
        if origin(url) == origin(self.base_url):
            headers.update(self._auth_headers())
        return headers

    def probe(self) -> int:
        """GET the base URL (no redirects followed); returns the HTTP status.

        Raises:
            ConfigError: the URL is refused by the SSRF guard.
            TransientError: connection failure or timeout.
        """
        target = pin_url(self.base_url, self.context.allowed_networks)
        try:
            response = self.http.get(
                target.url,
                headers={
                    **self._headers(self.base_url),
                    "Host": target.host_header,
                },
                extensions=target.extensions,
            )
        except httpx.HTTPError as exc:
            raise TransientError(
                f"cannot reach the File Processing Service: {type(exc).__name__}"
            ) from None
        return response.status_code

    def fetch(self, event: FileEvent, cache_dir: Path, name: str) -> Path:
        """The verified local copy of the event's file: cached, or downloaded now.

        Args:
            event: the announced file.
            cache_dir: the local cache folder.
            name: the file name in the cache (file id key, SHA-256, format suffix).

        Returns:
            The path of the verified file.

        Raises:
            ConfigError: the URL is refused (SSRF guard, another host).
            TerminalError: a size or SHA-256 mismatch, a 4xx, a file over
                `max_file_bytes`, too many redirects.
            TransientError: 5xx, 429, timeout or connection failure.
        """
        final = cache_dir / name
        if final.is_file():
            with contextlib.suppress(OSError):
                os.utime(final)  # keep it cached while it is used
            return final
        if event.size > self.max_bytes:
            raise TerminalError(
                f"file_id={event.file_id} announces {event.size} bytes, over "
                f"max_file_bytes ({self.max_bytes})"
            )
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _evict(cache_dir)
        partial = cache_dir / f".{name}.{uuid.uuid4().hex}.part"
        try:
            received, digest = self._download(event, partial)
            if received != event.size:
                got = f"more than {event.size}" if received > event.size else received
                raise TerminalError(
                    f"size mismatch for file_id={event.file_id}: expected "
                    f"{event.size} bytes, got {got}"
                )
            if digest != event.sha256.lower():
                raise TerminalError(
                    f"sha256 mismatch for file_id={event.file_id}: expected "
                    f"{event.sha256.lower()}, got {digest}"
                )
            os.replace(partial, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return final

    def _download(self, event: FileEvent, dest: Path) -> tuple[int, str]:
        """Stream the file into `dest`; stops one byte past the announced size."""
        url = self.absolute_url(event.url)
        what = f"download of file_id={event.file_id}"
        deadline = time.monotonic() + self.deadline_seconds
        headers = self._headers(url)
        for _ in range(MAX_REDIRECTS + 1):
            target = pin_url(url, self.context.allowed_networks)
            try:
                with self.http.stream(
                    "GET",
                    target.url,
                    headers={**headers, "Host": target.host_header},
                    extensions=target.extensions,
                ) as response:
                    status = response.status_code
                    location = response.headers.get("location")
                    if status in REDIRECT_STATUSES and location:
                        next_url = urljoin(url, location)
                        if origin(next_url) != origin(self.base_url):
                            headers = {
                                k: v
                                for k, v in headers.items()
                                if k not in self._auth_headers()
                            }
                        url = next_url
                        continue
                    path = urlsplit(url).path or "/"
                    if status >= 500 or status == 429:
                        raise TransientError(f"{what} ({path}) returned HTTP {status}")
                    if status >= 400:
                        raise TerminalError(f"{what} ({path}) returned HTTP {status}")
                    return self._write(response, event, dest, deadline, what)
            except httpx.TimeoutException:
                raise TransientError(
                    f"{what} timed out after {self.timeout:g}s"
                ) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise TransientError(f"{what} failed: {type(exc).__name__}") from None
        raise TerminalError(f"{what} was redirected more than {MAX_REDIRECTS} times")

    @staticmethod
    def _write(
        response: httpx.Response,
        event: FileEvent,
        dest: Path,
        deadline: float,
        what: str,
    ) -> tuple[int, str]:
        digest = hashlib.sha256()
        received = 0
        limit = event.size + 1  # enough to know the file is longer than announced
        with dest.open("wb") as out:
            for part in response.iter_raw(PART_BYTES):
                if received + len(part) > limit:
                    part = part[: limit - received]
                received += len(part)
                digest.update(part)
                out.write(part)
                if received >= limit:
                    break
                if time.monotonic() > deadline:
                    raise TransientError(
                        f"{what} took longer than download_deadline_seconds"
                    )
        return received, digest.hexdigest()


def _evict(cache_dir: Path) -> None:
    """Remove cached files (and abandoned partial ones) unused for a while."""
    horizon = time.time() - CACHE_TTL_SECONDS
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache_dir):
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < horizon:
                    os.unlink(entry.path)
