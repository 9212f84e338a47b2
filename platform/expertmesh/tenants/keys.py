"""API keys: format, hashing and verification.

A key is ``em_<key_id>_<secret>``: ``key_id`` is 12 lowercase hex characters (public, the
Redis lookup handle, so verification is one ``HGETALL``), ``secret`` is 32 random bytes in
URL-safe base64 (43 characters). Only ``scrypt(secret, salt)`` with a per-key 16-byte salt
is stored; the plaintext is shown once, at creation.

    em_3f9c0a1b2c4d_Zq3...    (55 characters)

scrypt costs ~45 ms per check at the default ``n=2**14``; :class:`VerifiedCache` remembers,
per process, which presented keys matched which stored hash, so a gateway pays that once
per key and still sees a revocation on the very next request (the stored record is read
every time and must still carry the same hash).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

KEY_PREFIX = "em"
KEY_ID_HEX_CHARS = 12
SECRET_BYTES = 32
SALT_BYTES = 16
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{KEY_ID_HEX_CHARS}}})_([A-Za-z0-9_-]{{20,128}})$")


class InvalidKey(Exception):
    """The presented key is malformed, unknown, revoked or wrong (callers answer 401)."""


@dataclass(frozen=True)
class HashParams:
    """scrypt cost: ``n`` (CPU/memory, power of two), ``r`` (block size), ``p`` (parallelism)."""

    n: int = 2**14
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two >= 2, got {self.n}")
        if self.r < 1 or self.p < 1:
            raise ValueError(f"scrypt r and p must be >= 1, got r={self.r} p={self.p}")

    def encode(self) -> str:
        return f"scrypt:{self.n}:{self.r}:{self.p}"

    @classmethod
    def decode(cls, text: str) -> HashParams:
        algo, n, r, p = text.split(":")
        if algo != "scrypt":
            raise ValueError(f"unknown key hash algorithm {algo!r}")
        return cls(int(n), int(r), int(p))


@dataclass(frozen=True)
class NewKey:
    """A freshly minted key: ``plaintext`` is shown once and never stored."""

    key_id: str
    plaintext: str
    salt_hex: str
    hash_hex: str
    params: HashParams


def hash_secret(secret: str, salt: bytes, params: HashParams) -> str:
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=params.n, r=params.r, p=params.p,
                            maxmem=256 * params.n * params.r + 1024 * 1024, dklen=32)
    return digest.hex()


def mint_key(params: HashParams) -> NewKey:
    key_id = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    salt = secrets.token_bytes(SALT_BYTES)
    return NewKey(key_id, f"{KEY_PREFIX}_{key_id}_{secret}", salt.hex(), hash_secret(secret, salt, params), params)


def parse_key(presented: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a well-formed key; :class:`InvalidKey` otherwise."""
    match = _KEY_RE.match(presented or "")
    if match is None:
        raise InvalidKey("malformed API key")
    return match.group(1), match.group(2)


def check_secret(secret: str, salt_hex: str, hash_hex: str, params: HashParams) -> bool:
    return hmac.compare_digest(hash_secret(secret, bytes.fromhex(salt_hex), params), hash_hex)


class VerifiedCache:
    """Fingerprint (SHA-256 of the presented key) -> the stored hash it was verified against.

    Bounded LRU; holds no secrets (a SHA-256 of a 256-bit random key reveals nothing usable).
    """

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def fingerprint(presented: str) -> str:
        return hashlib.sha256(presented.encode()).hexdigest()

    def matches(self, presented: str, stored_hash: str) -> bool:
        fp = self.fingerprint(presented)
        hit = self._entries.get(fp)
        if hit is None:
            return False
        self._entries.move_to_end(fp)
        return hmac.compare_digest(hit, stored_hash)

    def remember(self, presented: str, stored_hash: str) -> None:
        self._entries[self.fingerprint(presented)] = stored_hash
        self._entries.move_to_end(self.fingerprint(presented))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
