"""The HTTP client of the REST connector: guarded, authenticated, resilient.

Every request goes through the SSRF guard and connects to the address the guard
checked (the URL's host is rewritten to that address; `Host` and TLS SNI keep the
name), so a DNS answer cannot change between the check and the connection. Redirects
are followed by hand and checked again at every hop. Around each request: the shared
rate limit, the shared circuit breaker, retries with exponential backoff and jitter
on 5xx, timeouts and connection errors, `Retry-After` on 429, one token refresh on a
401 (OAuth2), a response size limit enforced while the body streams in, and a total
deadline per request. Error messages carry the status and a short body excerpt with
every secret removed, never the query string. Pure Python (no Django).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import httpx
import orjson

from connectors.base import ConnectorContext
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.resilience import CircuitOpenError, RateLimiter, SharedBreaker
from connectors.ssrf import pin_url, resolve_url

MAX_REDIRECTS = 5
EXCERPT_BYTES = 300
BACKOFF_CAP_SECONDS = 30.0
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "data-integration-service/rest"

_jitter = random.SystemRandom()


class _NoQueryInLogs(logging.Filter):
    """Drops the query string (an API key may be there) from httpx's request logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, httpx.URL) for a in record.args
        ):
            record.args = tuple(
                a.copy_with(query=None) if isinstance(a, httpx.URL) else a
                for a in record.args
            )
        return True


_httpx_logger = logging.getLogger("httpx")
if not any(isinstance(f, _NoQueryInLogs) for f in _httpx_logger.filters):
    _httpx_logger.addFilter(_NoQueryInLogs())


class ThrottledError(TransientError):
    """The server asked us to slow down (HTTP 429) for longer than we wait in-process.

    Attributes:
        retry_after: the seconds the server asked for (None when it did not say).
    """

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Response:
    """A complete response (the body is read, within the size limit)."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: str

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            TerminalError: the body is not JSON.
        """
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            path = urlsplit(self.url).path or "/"
            raise TerminalError(
                f"response of {path} is not JSON (HTTP {self.status})"
            ) from None


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, for same-origin comparisons."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), parts.port or default


def join_url(base_url: str, path: str) -> str:
    """`base_url` followed by `path` (an absolute URL in `path` is kept as is)."""
    if path.startswith(("http://", "https://")):
        return path
    if not path:
        return base_url
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def parse_retry_after(
    value: str | None, *, now: datetime | None = None
) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_delay(attempt: int, base: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    delay = min(BACKOFF_CAP_SECONDS, base * (2**attempt))
    return delay / 2 + _jitter.uniform(0, delay / 2)


class Redactor:
    """Removes secret values (and their URL-encoded forms) from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 3:
            self._secrets.add(secret)
            self._secrets.add(quote(secret, safe=""))
            self._secrets.add(quote(secret))

    def __call__(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


SECRET_FIELDS = ("token", "password", "api_key", "client_secret")


def config_redactor(config: dict[str, Any]) -> Redactor:
    """A redactor of the config's secrets (and the basic-auth header they make)."""
    redactor = Redactor(str(config[n]) for n in SECRET_FIELDS if config.get(n))
    if config.get("username") is not None and config.get("password"):
        raw = f"{config['username']}:{config['password']}".encode()
        redactor.add(base64.b64encode(raw).decode("ascii"))
    return redactor


# -- authentication ------------------------------------------------------------------


class Auth:
    """No authentication; the base of the auth strategies."""

    can_refresh = False

    def apply(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        """Add credentials to a request's headers or query parameters."""

    def invalidate(self) -> None:
        """Forget a token the server refused (only refreshable strategies)."""


class BearerAuth(Auth):
    """`Authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.token = token

    def apply(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        headers["Authorization"] = f"Bearer {self.token}"


class BasicAuth(Auth):
    """HTTP basic authentication."""

    def __init__(self, username: str, password: str) -> None:
        raw = f"{username}:{password}".encode()
        self.encoded = base64.b64encode(raw).decode("ascii")

    def apply(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        headers["Authorization"] = f"Basic {self.encoded}"


class ApiKeyAuth(Auth):
    """An API key in a header or a query parameter."""

    def __init__(self, key: str, name: str, where: str) -> None:
        self.key, self.name, self.where = key, name, where

    def apply(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        if self.where == "query":
            params[self.name] = self.key
        else:
            headers[self.name] = self.key


@dataclass
class _Token:
    value: str
    expires: float | None  # time.monotonic() after which it is stale


_tokens: dict[str, _Token] = {}
_tokens_lock = threading.Lock()


class OAuth2ClientCredentials(Auth):
    """OAuth2 client-credentials grant; the token is cached in the process.

    The token is refreshed shortly before `expires_in` runs out, and once after a 401
    (a token revoked early). The cache key includes a hash of the client secret, so a
    rotated secret gets a new token.
    """

    can_refresh = True

    def __init__(
        self,
        client: RestClient,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None,
        method: str,
    ) -> None:
        self.client = client
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope
        self.method = method
        digest = hashlib.sha256(
            "\x00".join([token_url, client_id, client_secret, scope or ""]).encode()
        ).hexdigest()
        self.cache_key = digest
        self._lock = threading.Lock()

    def token(self) -> str:
        """A valid access token, fetched when missing or about to expire."""
        with _tokens_lock:
            cached = _tokens.get(self.cache_key)
        if cached and (cached.expires is None or time.monotonic() < cached.expires):
            return cached.value
        with self._lock:
            with _tokens_lock:
                cached = _tokens.get(self.cache_key)
            if cached and (cached.expires is None or time.monotonic() < cached.expires):
                return cached.value
            fresh = self._fetch()
            with _tokens_lock:
                _tokens[self.cache_key] = fresh
            return fresh.value

    def _fetch(self) -> _Token:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.method == "client_secret_post":
            form["client_id"] = self.client_id
            form["client_secret"] = self.client_secret
        else:
            pair = (
                f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            )
            headers["Authorization"] = "Basic " + base64.b64encode(
                pair.encode()
            ).decode("ascii")
        started = time.monotonic()
        response = self.client.request(
            "POST",
            self.token_url,
            form=form,
            headers=headers,
            authenticate=False,
            guarded=False,
            what="OAuth2 token request",
        )
        try:
            payload = response.json()
            value = payload["access_token"]
        except (TerminalError, KeyError, TypeError):
            raise TerminalError("OAuth2 token response has no access_token") from None
        if not isinstance(value, str) or not value:
            raise TerminalError("OAuth2 token response has no access_token")
        self.client.redact.add(value)
        expires_in = payload.get("expires_in")
        expires = None
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            # Refresh a little early: 10% of the lifetime, at most 30 s.
            expires = started + float(expires_in) - min(30.0, expires_in / 10)
        return _Token(value, expires)

    def apply(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        headers["Authorization"] = f"Bearer {self.token()}"

    def invalidate(self) -> None:
        with _tokens_lock:
            _tokens.pop(self.cache_key, None)


# -- the client ------------------------------------------------------------------------


class RestClient:
    """HTTP requests to one REST API on behalf of one connector.

    Args:
        config: the connector's loaded config (see `RestConfig`).
        context: the run-time context (name, Redis, allow-list, correlation id).
        sleep: the sleep function (tests may replace it).
    """

    def __init__(
        self,
        config: dict[str, Any],
        context: ConnectorContext,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.context = context
        self.base_url: str = config["base_url"]
        self.timeout = float(config.get("timeout_seconds", 30.0))
        self.max_bytes = int(config.get("max_response_bytes", 50 * 1024 * 1024))
        self.max_retries = int(config.get("max_retries", 3))
        self.backoff = float(config.get("retry_backoff_seconds", 0.5))
        self.max_retry_after = float(config.get("max_retry_after_seconds", 60.0))
        self.headers: dict[str, str] = dict(config.get("headers") or {})
        self._sleep = sleep
        self.redact = config_redactor(config)
        self.name = context.name or "rest:" + (urlsplit(self.base_url).hostname or "")
        self.breaker = SharedBreaker(
            self.name,
            context.redis_url,
            fail_max=int(config.get("breaker_fail_max", 5)),
            reset_timeout=float(config.get("breaker_reset_seconds", 30.0)),
            probe_lease_seconds=max(self.timeout * 2, 5.0),
        )
        rate = config.get("rate_limit_per_second")
        self.limiter = (
            RateLimiter(
                self.name,
                float(rate),
                redis_url=context.redis_url,
                burst=config.get("rate_limit_burst"),
                max_wait=max(self.max_retry_after, 1.0),
                sleep=sleep,
            )
            if rate
            else None
        )
        self.auth = self._auth()
        # trust_env=False: no proxy from the environment may carry a request past
        # the SSRF guard; redirects are followed (and checked) by hand.
        self.http = httpx.Client(
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )

    def _auth(self) -> Auth:
        config = self.config
        kind = config.get("auth_type", "none")
        if kind == "bearer":
            return BearerAuth(config["token"])
        if kind == "basic":
            return BasicAuth(config["username"], config["password"])
        if kind == "api_key":
            return ApiKeyAuth(
                config["api_key"],
                config.get("api_key_name", "X-API-Key"),
                config.get("api_key_in", "header"),
            )
        if kind == "oauth2_client_credentials":
            return OAuth2ClientCredentials(
                self,
                token_url=config["token_url"],
                client_id=config["client_id"],
                client_secret=config["client_secret"],
                scope=config.get("scope"),
                method=config.get("token_auth_method", "client_secret_basic"),
            )
        return Auth()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    # -- the retry loop ----------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        authenticate: bool = True,
        guarded: bool = True,
        what: str | None = None,
    ) -> Response:
        """Send a request until it succeeds, retrying what may pass.

        Args:
            method: the HTTP method.
            url: an absolute URL, or a path joined to `base_url`.
            params: query parameters.
            json: a JSON body (serialised with orjson).
            content: a raw body (already serialised JSON).
            form: a form-encoded body.
            headers: extra headers of this request.
            authenticate: add the connector's credentials (only to the base URL's
                origin).
            guarded: go through the rate limiter and the circuit breaker.
            what: how messages name the request (default `METHOD /path`).

        Returns:
            The 2xx response.

        Raises:
            ConfigError: the URL is refused by the SSRF guard.
            TerminalError: a 4xx other than 429 (and 401 after a refresh), a body over
                `max_response_bytes`, too many redirects.
            ThrottledError: 429 with a `Retry-After` beyond the in-process cap, or
                still 429 after the retries.
            CircuitOpenError: the connector's breaker is open.
            TransientError: 5xx, timeout or connection failure after the retries.
        """
        url = join_url(self.base_url, url)
        what = what or f"{method} {urlsplit(url).path or '/'}"
        body = content
        extra = {"Content-Type": "application/json"} if body is not None else {}
        if json is not None:
            body = orjson.dumps(json)
            extra = {"Content-Type": "application/json"}
        elif form is not None:
            body = urlencode(form).encode()
            extra = {"Content-Type": "application/x-www-form-urlencoded"}
        attempt = 0
        refreshed = False
        while True:
            request_headers = {**self.headers, **extra, **(headers or {})}
            if self.context.correlation_id:
                request_headers["X-Correlation-ID"] = self.context.correlation_id
            request_params = dict(params or {})
            if authenticate and origin(url) == origin(self.base_url):
                self.auth.apply(request_headers, request_params)
            if guarded and self.limiter is not None:
                self.limiter.acquire()  # an oversubscribed budget raises at once
            try:
                if guarded:
                    response = self.breaker.call(
                        self._exchange,
                        method,
                        url,
                        request_params,
                        body,
                        request_headers,
                        what,
                    )
                else:
                    response = self._exchange(
                        method, url, request_params, body, request_headers, what
                    )
            except CircuitOpenError:
                raise
            except ThrottledError:
                raise
            except TransientError:
                if attempt >= self.max_retries:
                    raise
                self._sleep(backoff_delay(attempt, self.backoff))
                attempt += 1
                continue
            status = response.status
            if 200 <= status < 300:
                return response
            if status == 429:
                delay = parse_retry_after(response.headers.get("retry-after"))
                if delay is None:
                    delay = backoff_delay(attempt, self.backoff)
                if delay > self.max_retry_after or attempt >= self.max_retries:
                    raise ThrottledError(
                        f"{what} was throttled (HTTP 429); retry after {delay:.1f}s",
                        retry_after=delay,
                    )
                self._sleep(delay)
                attempt += 1
                continue
            if (
                status == 401
                and authenticate
                and self.auth.can_refresh
                and not refreshed
            ):
                self.auth.invalidate()
                refreshed = True
                continue
            raise TerminalError(
                f"{what} returned HTTP {status}: {self._excerpt(response.body)}"
            )

    def _excerpt(self, body: bytes) -> str:
        text = body[:EXCERPT_BYTES].decode("utf-8", errors="replace")
        text = " ".join(text.split())
        return self.redact(text) or "(empty body)"

    # -- one exchange (plus redirects) -------------------------------------------------

    def _exchange(
        self,
        method: str,
        url: str,
        params: dict[str, Any],
        body: bytes | None,
        headers: dict[str, str],
        what: str,
    ) -> Response:
        """One request, its redirects checked hop by hop; 5xx raise TransientError."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            target = pin_url(url, self.context.allowed_networks)
            resolved = target.resolved
            try:
                with self.http.stream(
                    method,
                    target.url,
                    params=params or None,
                    content=body,
                    headers={**headers, "Host": target.host_header},
                    extensions=target.extensions,
                ) as response:
                    status = response.status_code
                    location = response.headers.get("location")
                    if status in REDIRECT_STATUSES and location:
                        next_url = urljoin(url, location)
                        if origin(next_url) != origin(url):
                            headers = {
                                k: v
                                for k, v in headers.items()
                                if k.lower() != "authorization"
                            }
                        if status == 303 or (status in (301, 302) and method == "POST"):
                            method, body = "GET", None
                        url, params = next_url, {}
                        continue
                    if status >= 400:
                        data = self._read(
                            response, EXCERPT_BYTES, deadline, what, cap=True
                        )
                    else:
                        data = self._read(response, self.max_bytes, deadline, what)
            except httpx.TimeoutException:
                raise TransientError(
                    f"{what} timed out after {self.timeout:g}s"
                ) from None
            except httpx.ConnectError as exc:
                if _is_certificate_error(exc):
                    # A certificate that does not match will not heal by retrying.
                    raise TerminalError(
                        f"{what} failed: the TLS certificate of {resolved.host!r} "
                        "could not be verified"
                    ) from None
                raise TransientError(
                    f"{what} failed: ConnectError: {self.redact(str(exc))}"
                ) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise TransientError(
                    f"{what} failed: {type(exc).__name__}: {self.redact(str(exc))}"
                ) from None
            if status >= 500:
                raise TransientError(
                    f"{what} returned HTTP {status}: {self._excerpt(data)}"
                )
            return Response(status, response.headers, data, url)
        raise TerminalError(f"{what} was redirected more than {MAX_REDIRECTS} times")

    def _read(
        self,
        response: httpx.Response,
        limit: int,
        deadline: float,
        what: str,
        *,
        cap: bool = False,
    ) -> bytes:
        """The body, at most `limit` bytes (`cap`: cut there, else refuse beyond it)."""
        declared = response.headers.get("content-length")
        if not cap and declared and declared.isdigit() and int(declared) > limit:
            raise TerminalError(
                f"{what}: response of {int(declared)} bytes exceeds "
                f"max_response_bytes ({limit})"
            )
        data = bytearray()
        for part in response.iter_bytes():
            data += part
            if len(data) > limit:
                if cap:
                    return bytes(data[:limit])
                raise TerminalError(
                    f"{what}: response exceeds max_response_bytes ({limit})"
                )
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{what} timed out after {self.timeout:g}s (body still arriving)"
                )
        return bytes(data)


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_config_urls(config: dict[str, Any], context: ConnectorContext) -> None:
    """Run the SSRF guard over the config's URLs (base and token URL).

    Raises:
        ConfigError: a URL is refused.
        TransientError: the resolver failed temporarily.
    """
    for key in ("base_url", "token_url"):
        if config.get(key):
            try:
                resolve_url(config[key], context.allowed_networks)
            except ConfigError as exc:
                raise type(exc)(f"{key}: {exc}") from None
