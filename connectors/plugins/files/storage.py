"""Where the files are: a local directory or an S3-compatible bucket (fsspec).

Both storages take paths relative to the connector's root (a directory, or a key
prefix in the bucket) and refuse any path that leaves it. Reads are byte ranges
(`read_range`, one ranged GET on S3) or streams (`open`); a compressed file is read
through a decompressing stream, and a range of it means "these bytes of the
decompressed data", reached by decompressing and discarding what comes before.
Writes go to a temporary name in the same directory and are renamed when complete.
Pure Python (no Django).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import hashlib
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO

import pyarrow as pa

from connectors.base import CheckResult, ConnectorContext
from connectors.exceptions import ConfigError, TerminalError, TransientError

BLOCK_SIZE = 8 * 1024 * 1024
FINGERPRINT_HEAD_BYTES = 64 * 1024
GLOB_CHARS = frozenset("*?[")
#: Hidden directory of a local sink's lock files, and how many there are.
LOCK_DIRECTORY = ".dis-locks"
LOCK_STRIPES = 16

#: File name endings of the compressed encodings (`compression: auto`).
COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def has_glob(path: str) -> bool:
    """Whether `path` is a glob pattern (`*`, `?` or `[...]`)."""
    return any(ch in GLOB_CHARS for ch in path)


def matches(pattern: str, path: str) -> bool:
    """Whether `path` was (or could have been) found by the glob `pattern`.

    `*` and `?` stay within one path segment; `**` spans any number of them.
    """
    return _glob_regex(pattern).fullmatch(path) is not None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            out.append(fnmatch.translate(pattern[i : end + 1])[4:-3])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def detect_compression(path: str, option: str) -> str:
    """The compression of `path`: the option, or its name's ending when `auto`.

    Returns:
        `none`, `gzip` or `zstd`.
    """
    if option != "auto":
        return option
    _, ext = posixpath.splitext(path.lower())
    return COMPRESSION_SUFFIXES.get(ext, "none")


@functools.cache
def io_errors() -> tuple[type[Exception], ...]:
    """The exceptions a read or write of the storage may raise (OS and S3 client).

    The S3 client's are looked up on first use, so local-only use never imports
    botocore.
    """
    found: list[type[Exception]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        found.append(ClientError)
    return tuple(found)


def os_error(path: str, exc: Exception) -> ConfigError | TerminalError | TransientError:
    """Class an I/O error: a missing or forbidden file will not heal by retrying.

    Missing credentials are a config error; connection failures, timeouts and
    other client errors are transient.
    """
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return TerminalError(f"{path}: {exc.strerror or 'not found or not allowed'}")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return ConfigError(f"{path}: no usable S3 credentials")
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TransientError(f"{path}: {reason}")


def skip_bytes(stream: Any, count: int) -> None:
    """Read and discard `count` bytes of a (decompressing) stream, in blocks."""
    while count > 0:
        got = len(stream.read(min(count, BLOCK_SIZE)))
        if not got:
            break
        count -= got


def read_exactly(stream: Any, length: int) -> bytes:
    """Up to `length` bytes from `stream` (fewer only at its end)."""
    parts: list[bytes] = []
    while length > 0:
        part = stream.read(min(length, 1 << 30))
        if not part:
            break
        parts.append(part)
        length -= len(part)
    return b"".join(parts)


def _check_relative(path: str) -> list[str]:
    if not path or "\x00" in path:
        raise ConfigError(f"invalid path {path!r}")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise ConfigError(f"path {path!r} is outside the connector's root")
    return parts


class Storage:
    """Base of the storages: paths relative to a root, reads, atomic writes."""

    protocol = ""

    def check(self) -> CheckResult:
        raise NotImplementedError

    def url(self, path: str) -> str:
        """The lineage name of `path` (`file:///...`, `s3://bucket/...`)."""
        raise NotImplementedError

    def glob(self, pattern: str) -> list[str]:
        """Files matching `pattern`, as sorted paths relative to the root."""
        raise NotImplementedError

    def walk(self) -> Iterator[str]:
        """Every (non-hidden) file under the root, sorted, relative to the root."""
        raise NotImplementedError

    def open_raw(self, path: str) -> BinaryIO:
        """A seekable binary stream of the file's stored bytes."""
        raise NotImplementedError

    def read_raw_range(self, path: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def stat(self, path: str) -> tuple[int, str]:
        """(size, a version token: mtime or ETag)."""
        raise NotImplementedError

    def arrow_source(self, path: str) -> Any:
        """Something `pyarrow.parquet.ParquetFile` can read."""
        return self.open_raw(path)

    # -- shared reads -----------------------------------------------------------------

    def open(self, path: str, compression: str = "none") -> Any:
        """A stream of the file's (decompressed) bytes; a context manager."""
        raw = self.open_raw(path)
        if compression == "none":
            return raw
        return _Decompressed(raw, compression, path)

    def read_range(
        self, path: str, offset: int, length: int, compression: str = "none"
    ) -> bytes:
        """`length` bytes at `offset` of the (decompressed) data.

        Raises:
            TerminalError: the file is shorter than that (it changed since planning).
        """
        try:
            if compression == "none":
                data = self.read_raw_range(path, offset, length)
            else:
                with self.open(path, compression) as stream:
                    skip_bytes(stream, offset)
                    data = read_exactly(stream, length)
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        except pa.ArrowInvalid as exc:
            raise TerminalError(f"{path}: cannot decompress: {exc}") from exc
        if len(data) != length:
            raise TerminalError(f"{path}: the file is shorter than when it was planned")
        return data

    def fingerprint(self, path: str) -> str:
        """Size, version token and a hash of the first 64 KiB."""
        try:
            size, version = self.stat(path)
            head = self.read_raw_range(path, 0, min(size, FINGERPRINT_HEAD_BYTES))
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        digest = hashlib.sha256(head).hexdigest()[:16]
        return f"size={size}:{version}:head={digest}"

    # -- writes --------------------------------------------------------------------

    def makedirs(self, directory: str) -> None:
        """Create `directory` (relative to the root) if the storage has directories."""

    def write_atomically(
        self,
        path: str,
        produce: Callable[[IO[bytes]], None],
        before_commit: Callable[[], None],
    ) -> None:
        """Write `path` through a temporary name, then rename it into place.

        `produce` writes the content; `before_commit` runs between the complete
        temporary file and the rename (the sink's fence) and may raise, in which case
        the temporary file is deleted and nothing is visible.
        """
        raise NotImplementedError

    def chunk_lock(self, path: str) -> contextlib.AbstractContextManager[None]:
        """Serialise writers of `path` (attempts of one chunk)."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError


_CODEC_WORDS = ("zlib", "inflate", "gzip", "zstd", "decompress", "frame")


class _Decompressed:
    """A decompressing read stream that closes the stored-bytes stream with it."""

    def __init__(self, raw: BinaryIO, compression: str, path: str) -> None:
        self._raw = raw
        self._path = path
        self._compression = compression
        self._stream = pa.CompressedInputStream(
            pa.PythonFile(raw, mode="r"), compression
        )

    def read(self, size: int = -1) -> bytes:
        try:
            if size is None or size < 0:
                return self._stream.read()  # type: ignore[no-any-return]
            return self._stream.read(size)  # type: ignore[no-any-return]
        except OSError as exc:
            # Arrow reports corrupt data as an OSError without errno; the words
            # tell it from a failing read of the stored bytes (which stays an
            # OSError, classed by `os_error`).
            text = str(exc).lower()
            if exc.errno is None and any(w in text for w in _CODEC_WORDS):
                raise TerminalError(
                    f"{self._path}: cannot decompress ({self._compression}): {exc}"
                ) from exc
            raise

    def tell(self) -> int:
        return int(self._stream.tell())

    def close(self) -> None:
        self._stream.close()
        self._raw.close()

    def __enter__(self) -> _Decompressed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStorage(Storage):
    """Files under a local directory; symbolic links are resolved before the check."""

    protocol = "file"

    def __init__(self, root: str) -> None:
        self.configured_root = root

    @property
    def root(self) -> str:
        return os.path.realpath(self.configured_root)

    def resolve(self, path: str) -> str:
        """The real path of `path` (relative to root), refusing anything outside root.

        Raises:
            ConfigError: when the path escapes the root.
        """
        root = self.root
        try:
            resolved = os.path.realpath(os.path.join(root, path))
        except ValueError:  # an embedded NUL byte
            raise ConfigError(f"invalid path {path!r}") from None
        if os.path.commonpath([root, resolved]) != root or resolved == root:
            raise ConfigError(f"path {path!r} is outside the connector's root")
        return resolved

    def check(self) -> CheckResult:
        root = self.configured_root
        if not os.path.isdir(root):
            return CheckResult(False, f"root {root} is not a directory")
        try:
            with os.scandir(root) as entries:
                next(entries, None)
        except OSError as exc:
            return CheckResult(False, f"root {root} is not readable: {exc.strerror}")
        return CheckResult(True, f"root {root} is readable")

    def url(self, path: str) -> str:
        return "file://" + os.path.join(self.root, path)

    def glob(self, pattern: str) -> list[str]:
        if os.path.isabs(pattern):
            pattern = os.path.relpath(pattern, self.root)
        _check_relative(pattern)
        root = self.root
        found = []
        for name in glob.glob(os.path.join(glob.escape(root), pattern), recursive=True):
            relative = os.path.relpath(name, root).replace(os.sep, "/")
            try:
                resolved = self.resolve(relative)
            except ConfigError:  # a symbolic link that leads out of root
                continue
            if os.path.isfile(resolved):
                found.append(relative)
        return sorted(found)

    def walk(self) -> Iterator[str]:
        root = self.root
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                relative = os.path.relpath(os.path.join(directory, name), root)
                yield relative.replace(os.sep, "/")

    def open_raw(self, path: str) -> BinaryIO:
        return open(self.resolve(path), "rb")

    def arrow_source(self, path: str) -> Any:
        return self.resolve(path)

    def read_raw_range(self, path: str, offset: int, length: int) -> bytes:
        fd = os.open(self.resolve(path), os.O_RDONLY)
        try:
            parts: list[bytes] = []
            while length > 0:
                part = os.pread(fd, min(length, 1 << 30), offset)
                if not part:
                    break
                parts.append(part)
                length -= len(part)
                offset += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def stat(self, path: str) -> tuple[int, str]:
        info = os.stat(self.resolve(path))
        return info.st_size, f"mtime_ns={info.st_mtime_ns}"

    def makedirs(self, directory: str) -> None:
        target = self._target(posixpath.join(directory, "x"))
        os.makedirs(os.path.dirname(target), exist_ok=True)

    def _target(self, path: str) -> str:
        """The absolute path to write `path` at (its directory may not exist yet)."""
        _check_relative(path)
        root = self.root
        target = os.path.normpath(os.path.join(root, path))
        parent = os.path.realpath(os.path.dirname(target))
        if os.path.commonpath([root, parent]) != root:
            raise ConfigError(f"path {path!r} is outside the connector's root")
        return os.path.join(parent, os.path.basename(target))

    def write_atomically(
        self,
        path: str,
        produce: Callable[[IO[bytes]], None],
        before_commit: Callable[[], None],
    ) -> None:
        target = self._target(path)
        directory, name = os.path.split(target)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "xb") as stream:
                produce(stream)
                stream.flush()
                os.fsync(stream.fileno())
            before_commit()
            os.replace(temporary, target)
            _fsync_directory(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    @contextlib.contextmanager
    def chunk_lock(self, path: str) -> Iterator[None]:
        import fcntl  # POSIX only; the service runs on Linux

        target = self._target(path)
        directory, name = os.path.split(target)
        # A fixed set of lock files per directory (never deleted: deleting a lock
        # file races with a waiter). Two chunks sharing one only wait a little.
        locks = os.path.join(directory, LOCK_DIRECTORY)
        os.makedirs(locks, exist_ok=True)
        stripe = int(hashlib.sha256(name.encode()).hexdigest(), 16) % LOCK_STRIPES
        fd = os.open(
            os.path.join(locks, f"{stripe:02d}.lock"), os.O_RDWR | os.O_CREAT, 0o644
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._target(path))


def _fsync_directory(directory: str) -> None:
    """Make a rename durable (the directory entry), where the OS allows it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def guarded_resolver(context: ConnectorContext) -> Any:
    """An aiohttp resolver that passes every host name through the SSRF guard.

    aiohttp connects to the addresses a resolver returns, so the addresses the guard
    checked are the ones connected to (no second lookup). A refused or unresolvable
    name raises `OSError`, which the S3 client reports as a connection failure.
    """
    import asyncio
    import socket

    from aiohttp.abc import AbstractResolver, ResolveResult

    from connectors.exceptions import ConnectorError
    from connectors.ssrf import resolve_host

    allowed = tuple(context.allowed_networks)

    class GuardedResolver(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: int = socket.AF_INET
        ) -> list[ResolveResult]:
            try:
                addresses = await asyncio.to_thread(resolve_host, host, port, allowed)
            except ConnectorError as exc:
                raise OSError(f"S3 endpoint refused by the SSRF guard: {exc}") from None
            results: list[ResolveResult] = []
            for address in addresses:
                af = socket.AF_INET6 if ":" in address else socket.AF_INET
                if family in (socket.AF_INET, socket.AF_INET6) and af != family:
                    continue
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=address,
                        port=port,
                        family=af,
                        proto=0,
                        flags=socket.AI_NUMERICHOST,
                    )
                )
            if not results:
                raise OSError(f"host {host!r} has no address of the wanted family")
            return results

        async def close(self) -> None:
            return None

    return GuardedResolver()


class S3Storage(Storage):
    """Objects under a key prefix of an S3-compatible bucket, through s3fs.

    Renames are copies: the final key appears whole (an S3 PUT or COPY is atomic for
    readers) only once the temporary object is complete and the fence passed.
    Attempts of one chunk are serialised within a process only (S3 has no locks);
    two processes racing on one chunk both write its full content, the last rename
    wins, and the fence stops a superseded attempt before it renames.
    """

    protocol = "s3"

    def __init__(self, config: dict[str, Any], context: ConnectorContext) -> None:
        self.bucket: str = config["bucket"]
        self.prefix = (config.get("root") or "").strip("/")
        self.config = config
        self.context = context
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import s3fs
            except ImportError:  # pragma: no cover - s3fs is a runtime requirement
                raise ConfigError("the s3 protocol needs the s3fs package") from None
            endpoint = self.config.get("endpoint_url")
            if endpoint:
                from connectors.ssrf import check_url

                check_url(endpoint, self.context.allowed_networks)
            # The client resolves every host name through the guard when it
            # connects, and connects to the addresses the guard checked: a DNS
            # answer that changes after the check above cannot reach the private
            # network (DNS rebinding). IP literals are not resolved at all.
            connector_args = {"resolver": guarded_resolver(self.context)}
            client_kwargs: dict[str, Any] = {}
            if self.config.get("region"):
                client_kwargs["region_name"] = self.config["region"]
            key = self.config.get("aws_access_key_id")
            secret = self.config.get("aws_secret_access_key")
            self._fs = s3fs.S3FileSystem(
                key=key,
                secret=secret,
                endpoint_url=endpoint,
                client_kwargs=client_kwargs,
                # A failing endpoint surfaces quickly as a TransientError: the task's
                # own retry (with backoff) is the one that waits.
                config_kwargs={
                    "connect_timeout": 10,
                    "read_timeout": 60,
                    "retries": {"max_attempts": 2, "mode": "standard"},
                    "connector_args": connector_args,
                },
                default_block_size=BLOCK_SIZE,
                use_listings_cache=False,
            )
        return self._fs

    def _key(self, path: str) -> str:
        parts = _check_relative(path)
        return "/".join([self.bucket, *([self.prefix] if self.prefix else []), *parts])

    def _relative(self, key: str) -> str:
        base = "/".join([self.bucket, *([self.prefix] if self.prefix else [])]) + "/"
        return key[len(base) :] if key.startswith(base) else key

    def check(self) -> CheckResult:
        base = "/".join([self.bucket, *([self.prefix] if self.prefix else [])])
        try:
            self.fs.ls(base, detail=False)
        except FileNotFoundError:
            if self.prefix:  # an empty prefix is fine: it appears with the first file
                try:
                    self.fs.ls(self.bucket, detail=False)
                    return CheckResult(True, f"bucket {self.bucket} is readable")
                except io_errors() as exc:
                    return CheckResult(False, f"bucket {self.bucket}: {_reason(exc)}")
            return CheckResult(False, f"bucket {self.bucket} does not exist")
        except (*io_errors(), ConfigError) as exc:
            return CheckResult(False, f"bucket {self.bucket}: {_reason(exc)}")
        return CheckResult(True, f"s3://{base} is readable")

    def url(self, path: str) -> str:
        return "s3://" + self._key(path)

    def glob(self, pattern: str) -> list[str]:
        try:
            found = self.fs.glob(self._key(pattern), detail=True)
        except io_errors() as exc:
            raise os_error(pattern, exc) from exc
        return sorted(
            self._relative(key)
            for key, info in found.items()
            if info.get("type") == "file"
            and not posixpath.basename(key).startswith(".")
        )

    def walk(self) -> Iterator[str]:
        base = "/".join([self.bucket, *([self.prefix] if self.prefix else [])])
        for key in sorted(self.fs.find(base)):
            relative = self._relative(key)
            if not any(p.startswith(".") for p in relative.split("/")):
                yield relative

    def open_raw(self, path: str) -> BinaryIO:
        return self.fs.open(self._key(path), "rb", block_size=BLOCK_SIZE)  # type: ignore[no-any-return]

    def read_raw_range(self, path: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        return self.fs.cat_file(self._key(path), start=offset, end=offset + length)  # type: ignore[no-any-return]

    def stat(self, path: str) -> tuple[int, str]:
        info = self.fs.info(self._key(path))
        if info.get("type") != "file":
            raise FileNotFoundError(2, "not a file", path)
        return int(info["size"]), f"etag={str(info.get('ETag', '')).strip(chr(34))}"

    def write_atomically(
        self,
        path: str,
        produce: Callable[[IO[bytes]], None],
        before_commit: Callable[[], None],
    ) -> None:
        key = self._key(path)
        directory, name = posixpath.split(key)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open(temporary, "wb") as stream:
                produce(stream)
            before_commit()
            self.fs.copy(temporary, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(temporary)
        self.fs.invalidate_cache(directory)

    @contextlib.contextmanager
    def chunk_lock(self, path: str) -> Iterator[None]:
        digest = hashlib.sha256(self._key(path).encode()).digest()
        with _S3_LOCKS[digest[0] % len(_S3_LOCKS)]:
            yield

    def exists(self, path: str) -> bool:
        key = self._key(path)
        self.fs.invalidate_cache(posixpath.dirname(key))
        return bool(self.fs.isfile(key))


#: Locks of this process's S3 sink writes, by a hash of the key (S3 has none).
_S3_LOCKS = [threading.Lock() for _ in range(64)]


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def make_storage(config: dict[str, Any], context: ConnectorContext) -> Storage:
    """The storage the loaded connector config describes."""
    if config.get("protocol", "file") == "s3":
        return S3Storage(config, context)
    return LocalStorage(config["root"])
