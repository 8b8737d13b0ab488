"""The SSRF guard: user-supplied HTTP URLs may only reach public addresses.

A URL's host is resolved once and every address it resolves to is checked; the caller
then connects to one of those checked addresses (never resolving the name a second
time), so a DNS answer that changes between the check and the connection (DNS
rebinding) cannot lead a request into the private network. Loopback, private,
link-local (cloud metadata), carrier-grade NAT, multicast, reserved and unspecified
addresses are refused, including IPv6 addresses that embed an IPv4 one (IPv4-mapped
`::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo), unless the address
is inside a CIDR of the operator's allow-list. Pure Python (no Django).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from connectors.exceptions import ConfigError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # well-known NAT64 prefix (RFC 6052)
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated `::a.b.c.d`


class UnsafeUrlError(ConfigError):
    """A URL the SSRF guard refuses: wrong scheme, or a non-public address."""


@dataclass(frozen=True)
class ResolvedUrl:
    """A URL that passed the guard and the addresses it was checked against.

    Attributes:
        scheme: `http` or `https`.
        host: the host name as written in the URL (lowercase, no brackets).
        port: the explicit or default port.
        addresses: every address the host resolved to, all allowed, in resolver
            order; connect to one of these, never to a fresh lookup of `host`.
    """

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def parse_networks(allowed_networks: tuple[str, ...] | list[str]) -> list[IPNetwork]:
    """Parse an allow-list of CIDRs (`"10.0.0.0/8"`, `"127.0.0.1/32"`, `"::1/128"`).

    Raises:
        ConfigError: for an entry that is not a CIDR.
    """
    networks: list[IPNetwork] = []
    for entry in allowed_networks:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"invalid allowed network {entry!r}") from None
    return networks


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one embeds (mapped, NAT64, 6to4, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's (obfuscation removed) address
    if any(address in net for net in _NAT64) or (
        address in _IPV4_COMPATIBLE and int(address) > 1
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address (and so is any IPv4 it embeds)."""
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    ):
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address not in _CGNAT
    if address.is_site_local:
        return False
    inner = embedded_ipv4(address)
    return inner is None or is_public(inner)


def is_allowed(address: IPAddress, networks: list[IPNetwork]) -> bool:
    """Whether the guard lets a connection to `address` through.

    Args:
        address: the address to connect to.
        networks: the parsed allow-list (see `parse_networks`).

    Returns:
        True for a public address, or one (or the IPv4 it embeds) inside an allowed
        network.
    """
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            candidates.append(inner)
    for candidate in candidates:
        if any(
            candidate.version == net.version and candidate in net for net in networks
        ):
            return True
    return is_public(address)


def _split(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrlError(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeUrlError(
            f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https"
        )
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrlError("credentials in a URL are not allowed: use a credential")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeUrlError("URL has no host")
    return scheme, host, port or DEFAULT_PORTS[scheme]


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            raise UnsafeUrlError(f"host {host!r} does not resolve") from None
        raise TransientError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    except UnicodeError:
        raise UnsafeUrlError(f"invalid host name {host!r}") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeUrlError(f"host {host!r} does not resolve")
    return addresses


def resolve_url(url: str, allowed_networks: tuple[str, ...] | list[str]) -> ResolvedUrl:
    """Check `url` and resolve its host, refusing any non-public address.

    Every A/AAAA record is checked: one refused address refuses the URL, so a name
    that resolves to both a public and a private address cannot be used.

    Args:
        url: the URL a user supplied.
        allowed_networks: CIDRs that may be reached although not public.

    Returns:
        The URL's scheme, host, port and the checked addresses to connect to.

    Raises:
        UnsafeUrlError: (a `ConfigError`) a scheme other than http(s), credentials in
            the URL, a host that does not resolve, or a refused address.
        TransientError: the resolver failed temporarily.
    """
    scheme, host, port = _split(url)
    networks = parse_networks(allowed_networks)
    addresses = _resolve(host, port)
    refused = [a for a in addresses if not is_allowed(a, networks)]
    if refused:
        raise UnsafeUrlError(
            f"host {host!r} resolves to a non-public address ({refused[0]}); "
            "add its network to the allow-list if this is intended"
        )
    return ResolvedUrl(scheme, host, port, tuple(str(a) for a in addresses))


def check_url(url: str, allowed_networks: tuple[str, ...] | list[str]) -> None:
    """Refuse a URL the guard would not connect to (see `resolve_url`).

    Raises:
        UnsafeUrlError: (a `ConfigError`) when the URL is refused.
        TransientError: the resolver failed temporarily.
    """
    resolve_url(url, allowed_networks)


@dataclass(frozen=True)
class PinnedUrl:
    """A request target that connects to the address the guard checked.

    Send the request to `url` (the host replaced by the checked address) with the
    `Host` header `host_header`; for https pass `sni_hostname` to the TLS layer (in
    httpx: `extensions={"sni_hostname": ...}`) so the certificate is verified for
    the name, not the address.

    Attributes:
        url: the URL with its host replaced by the first checked address.
        host_header: the original host (and port when not the default).
        sni_hostname: the name for TLS SNI and certificate checks (https only).
        resolved: what the guard checked.
    """

    url: str
    host_header: str
    sni_hostname: str | None
    resolved: ResolvedUrl

    @property
    def extensions(self) -> dict[str, str]:
        """httpx request extensions: the SNI name of an https request."""
        return {"sni_hostname": self.sni_hostname} if self.sni_hostname else {}


def pin_url(url: str, allowed_networks: tuple[str, ...] | list[str]) -> PinnedUrl:
    """Check `url` with the guard and build the pinned request target for it.

    The one place the pinned-connection approach lives (REST connector, webhooks,
    File Processing Service downloads): call it again for every redirect hop.

    Raises:
        UnsafeUrlError: (a `ConfigError`) when the URL is refused.
        TransientError: the resolver failed temporarily.
    """
    resolved = resolve_url(url, allowed_networks)
    parts = urlsplit(url)
    address = resolved.addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    pinned = urlunsplit(
        (
            parts.scheme.lower(),
            f"{netloc}:{resolved.port}",
            parts.path or "/",
            parts.query,
            "",
        )
    )
    host_header = f"[{resolved.host}]" if ":" in resolved.host else resolved.host
    if resolved.port != DEFAULT_PORTS[resolved.scheme]:
        host_header += f":{resolved.port}"
    sni = resolved.host if resolved.scheme == "https" else None
    return PinnedUrl(pinned, host_header, sni, resolved)


class UnsafeHostError(ConfigError):
    """A database or Kafka host that resolves to a non-public, non-allowed address."""


def check_host(
    host: str, port: int, allowed_networks: tuple[str, ...] | list[str]
) -> tuple[str, ...]:
    """Refuse a database or Kafka broker host that reaches a non-public address.

    The same address rules as for URLs, with the data allow-list (a separate setting:
    the networks databases and brokers live in are not those webhooks may reach).
    The drivers (libpq, PyMySQL, librdkafka) resolve the name again when they
    connect, so this check is not pinned to the address it saw.

    Args:
        host: a host name or an IP address (IPv6 with or without brackets).
        port: the port (for the resolver).
        allowed_networks: CIDRs that may be reached although not public.

    Returns:
        The checked addresses; empty when the name does not resolve (the
        connection then fails by itself).

    Raises:
        UnsafeHostError: (a `ConfigError`) the host resolves to a refused address.
        TransientError: the resolver failed temporarily.
    """
    networks = parse_networks(allowed_networks)
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    try:
        addresses = _resolve(name, port)
    except UnsafeUrlError:
        return ()
    refused = [a for a in addresses if not is_allowed(a, networks)]
    if refused:
        raise UnsafeHostError(
            f"host {name!r} resolves to a non-public address ({refused[0]}); add "
            "its network to the database and Kafka allow-list if this is intended"
        )
    return tuple(str(a) for a in addresses)


def resolve_host(
    host: str, port: int, allowed_networks: tuple[str, ...] | list[str]
) -> tuple[str, ...]:
    """Resolve `host` and return its addresses, all checked by the guard.

    For clients that resolve at connection time through a hook (the S3 client's
    aiohttp resolver): they connect to exactly what this returns.

    Raises:
        UnsafeUrlError: (a `ConfigError`) the host does not resolve, or resolves to
            a refused address.
        TransientError: the resolver failed temporarily.
    """
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    networks = parse_networks(allowed_networks)
    addresses = _resolve(name, port)
    refused = [a for a in addresses if not is_allowed(a, networks)]
    if refused:
        raise UnsafeUrlError(
            f"host {name!r} resolves to a non-public address ({refused[0]}); "
            "add its network to the allow-list if this is intended"
        )
    return tuple(str(a) for a in addresses)
