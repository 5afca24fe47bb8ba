"""Who may call the HTTP API and how often: API keys, a request rate per key, and the
address the replicas listen on when there are no keys.

Why hashes: the keys reach the replicas through the app's config, which Serve keeps in the
cluster and its dashboard shows; so the config carries each key's sha256, never the key.
A key is random (`dlpipe serve keygen` makes 256 bits), so its plain sha256 cannot be
guessed back; a slow password hash would only slow every request.

Where keys come from (read by `dlpipe serve`, or by the cluster process that builds the
app for `serve deploy` / a RayService):
- `DLPIPE_API_KEYS`: keys themselves, comma-separated (e.g. from a Kubernetes Secret);
- `DLPIPE_API_KEYS_FILE`: a file of `NAME SHA256` lines, what `dlpipe serve keygen` appends.
Clients send `Authorization: Bearer KEY`; dlpipe's own commands send `DLPIPE_API_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ENV_KEYS = "DLPIPE_API_KEYS"
ENV_KEYS_FILE = "DLPIPE_API_KEYS_FILE"
ENV_CLIENT_KEY = "DLPIPE_API_KEY"
MIN_KEY_CHARS = 16
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""What answers without a key: probes (Kubernetes, load balancers) carry none."""
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

_HASH = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]+$")


class KeyConfigError(ValueError):
    """The configured keys cannot be used; the message names the variable or file line."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return secrets.token_urlsafe(32)


def configured_key_hashes(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """name -> sha256 of every key in `DLPIPE_API_KEYS` (named key-1, key-2, ...) and in
    the file `DLPIPE_API_KEYS_FILE` names. Empty when neither is set."""
    hashes: dict[str, str] = {}
    listed = [k.strip() for k in environ.get(ENV_KEYS, "").split(",") if k.strip()]
    for number, key in enumerate(listed, start=1):
        if len(key) < MIN_KEY_CHARS:
            raise KeyConfigError(
                f"{ENV_KEYS}: key {number} is {len(key)} characters, fewer than "
                f"{MIN_KEY_CHARS}: make one with `dlpipe serve keygen`"
            )
        hashes[f"key-{number}"] = hash_key(key)
    if environ.get(ENV_KEYS_FILE):
        hashes.update(read_key_file(Path(environ[ENV_KEYS_FILE])))
    return hashes


def read_key_file(path: Path) -> dict[str, str]:
    """A keys file's `NAME SHA256` lines (blank lines and `#` comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyConfigError(f"{ENV_KEYS_FILE}={path}: cannot read it ({exc})") from None
    hashes: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.match(parts[0]) or not _HASH.match(parts[1]):
            raise KeyConfigError(
                f"{path}:{number}: expected `NAME SHA256` (a name, then the key's sha256 in "
                "64 lower-case hex digits, as `dlpipe serve keygen` writes), not the key itself"
            )
        if parts[0] in hashes:
            raise KeyConfigError(f"{path}:{number}: the name {parts[0]!r} is used twice")
        hashes[parts[0]] = parts[1]
    return hashes


def append_key(path: Path, name: str) -> str:
    """Make a key for `name`, append its hash to the keys file `path`; return the key (the
    only time it is ever shown)."""
    if not _NAME.match(name):
        raise KeyConfigError(f"key name {name!r}: use letters, digits, and _ . @ - only")
    existing = read_key_file(path) if path.exists() else {}
    if name in existing:
        raise KeyConfigError(
            f"{path}: a key named {name!r} exists; revoke it (delete its line) first"
        )
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"{name} {hash_key(key)}\n")
    path.chmod(0o600)
    return key


class KeyCheck:
    """Checks `Authorization: Bearer KEY` against the configured hashes. Constant time: the
    presented key is hashed, then compared with every stored hash by `hmac.compare_digest`
    (no early exit), so the answer's timing says nothing about how close a guess was."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._keys = [(name, bytes.fromhex(digest)) for name, digest in hashes.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key presented, or None when it is missing or unknown."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode("utf-8", "replace")).digest()
        found = None
        for name, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = name
        return found


class RateLimit:
    """A token bucket per key: `per_s` requests a second, bursts of up to `burst` (default:
    one second's worth). Per replica: N replicas admit up to N times the rate."""

    def __init__(
        self, per_s: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_s = per_s
        self.burst = burst if burst is not None else max(1.0, per_s)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def wait_s(self, key: str) -> float:
        """0 when a request of `key` is admitted now (and counted), else the seconds until
        it would be."""
        if self.per_s <= 0:
            return 0.0
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_s)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.per_s


def retry_after(seconds: float) -> str:
    """The Retry-After header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def listen_host(host: str, keys: bool, allow_unauthenticated: bool) -> tuple[str, str]:
    """The address to listen on for the configured `host`, and the line that says why.

    Without keys, anyone who reaches the port may call every endpoint: so the app then
    listens on 127.0.0.1 only, unless `http.allow_unauthenticated` says otherwise."""
    if keys:
        return host, f"API keys required on {host} (Authorization: Bearer KEY)"
    if host in LOOPBACK:
        return host, f"no API keys configured: listening on {host} only (this machine)"
    if allow_unauthenticated:
        return host, (
            f"WARNING: no API keys and listening on {host}: anyone who reaches the port can "
            "call every endpoint (http.allow_unauthenticated is true)"
        )
    return "127.0.0.1", (
        f"no API keys configured: listening on 127.0.0.1 only, not {host}. Set {ENV_KEYS} or "
        f"{ENV_KEYS_FILE} (dlpipe serve keygen) to serve other machines, or "
        "http.allow_unauthenticated: true (dlpipe serve --allow-unauthenticated) on a "
        "network you trust"
    )


def client_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What dlpipe's own client commands add to each request: the key in DLPIPE_API_KEY."""
    key = environ.get(ENV_CLIENT_KEY, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}
