"""API keys: generation, hashing, bearer authentication with a short cache, and role checks."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repo
from app.db.models import ApiKey, Role
from app.errors import Conflict, NotFound, PermissionDenied, Unauthorized

__all__ = [
    "Authenticator",
    "Principal",
    "Role",
    "create_key",
    "ensure_admin_key",
    "generate_api_key",
    "hash_api_key",
    "revoke_key",
]

logger = logging.getLogger(__name__)

KEY_PREFIX = "sa-"
SHOWN_PREFIX_LEN = 12
BOOTSTRAP_KEY_NAME = "bootstrap-admin"
_BEARER_HINT = "Send 'Authorization: Bearer <key>'; `selfadapt keys create` makes one."
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Our keys carry 256 random bits, so nobody can brute-force a preimage and a slow,
    # salted password hash (bcrypt/argon2) would only slow down every request. Plain sha256
    # also lets us look a key up by its hash with a unique index.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who made the request: the key that authenticated it and its role."""

    key_id: int
    name: str
    role: Role

    def require(self, role: Role) -> None:
        """Raises PermissionDenied unless this principal's role includes `role`."""
        if not self.role.includes(role):
            raise PermissionDenied(
                f"This endpoint needs the '{role}' role; key '{self.name}' has '{self.role}'."
            )

    @classmethod
    def from_row(cls, row: ApiKey) -> Principal:
        return cls(key_id=row.id, name=row.name, role=row.role)


class Authenticator:
    """Checks bearer keys against SQL and remembers good ones for `cache_ttl_s`.

    The cache keeps the inference hot path off SQL. A revoked key stays valid in *other*
    processes for at most `cache_ttl_s`; `invalidate()` drops this process's cache at once.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        cache_ttl_s: float,
        max_cached: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._ttl = cache_ttl_s
        self._max_cached = max_cached
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal for an `Authorization` header value.

        Raises:
            Unauthorized: the header is missing or malformed, or the key is unknown or revoked.
        """
        key_hash = hash_api_key(_parse_bearer(authorization_header))
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await self._lookup(key_hash)
        if principal is None:
            self._cache.pop(key_hash, None)
            raise Unauthorized(f"Invalid API key. {_BEARER_HINT}", headers=_CHALLENGE)
        self._remember(key_hash, principal, now)
        return principal

    def invalidate(self) -> None:
        """Forget every cached key (after a revoke, so it stops working here at once)."""
        self._cache.clear()

    async def _lookup(self, key_hash: str) -> Principal | None:
        async with self._sessionmaker() as session:
            row = await repo.get_active_key_by_hash(session, key_hash=key_hash)
            if row is None:
                return None
            # Written once per cache miss, not per request: "used within the last few seconds".
            await repo.touch_last_used(session, key_id=row.id)
            await session.commit()
            return Principal.from_row(row)

    def _remember(self, key_hash: str, principal: Principal, now: float) -> None:
        if self._ttl <= 0:
            return
        if len(self._cache) >= self._max_cached:
            self._cache = {h: e for h, e in self._cache.items() if e[0] > now}
        while len(self._cache) >= self._max_cached:  # still full: drop the oldest entries
            del self._cache[next(iter(self._cache))]
        self._cache[key_hash] = (now + self._ttl, principal)


def _parse_bearer(header: str | None) -> str:
    if header is None or not header.strip():
        raise Unauthorized(
            f"Missing API key. {_BEARER_HINT}", code="missing_api_key", headers=_CHALLENGE
        )
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized(f"Malformed Authorization header. {_BEARER_HINT}", headers=_CHALLENGE)
    return key


async def create_key(
    session: AsyncSession, *, name: str, role: Role, key: str | None = None
) -> tuple[ApiKey, str]:
    """Stores a new key (random unless `key` is given) and returns its row and plaintext.

    The caller commits.
    """
    plaintext = key if key is not None else generate_api_key()
    row = await repo.create_api_key(
        session,
        name=name,
        role=role,
        key_hash=hash_api_key(plaintext),
        prefix=plaintext[:SHOWN_PREFIX_LEN],
    )
    return row, plaintext


async def revoke_key(session: AsyncSession, *, key_id: int) -> ApiKey:
    """Revokes a key (idempotent) and returns its row. The caller commits.

    Raises:
        NotFound: no key has this id.
        Conflict: it is the last active admin key, which would lock every admin out.
    """
    row = await repo.get_api_key(session, key_id=key_id)
    if row is None:
        raise NotFound(f"No API key with id {key_id}.", code="api_key_not_found")
    if row.role == Role.admin and row.revoked_at is None:
        admins = await repo.active_admin_ids(session, lock=True)
        if admins == [row.id]:
            raise Conflict(
                "Refusing to revoke the last active admin key; create another admin key first.",
                code="last_admin_key",
            )
    await repo.revoke_api_key(session, key=row)
    return row


async def ensure_admin_key(
    sessionmaker: async_sessionmaker[AsyncSession], *, preset: str | None
) -> str | None:
    """Creates an admin key when none is active, so a fresh install can be administered.

    Args:
        sessionmaker: where the keys live (migrations must have run).
        preset: the plaintext to use (settings.bootstrap_admin_key); random when None.

    Returns:
        The new key's plaintext, to print once; None when an active admin key already exists.
    """
    async with sessionmaker() as session:
        if await repo.active_admin_ids(session):
            return None
        if preset is not None:
            existing = await repo.get_api_key_by_hash(session, key_hash=hash_api_key(preset))
            if existing is not None:  # the preset was revoked by hand: bring it back as admin
                logger.warning("re-activating the bootstrap admin key %s", existing.prefix)
                existing.revoked_at = None
                existing.role = Role.admin
                await session.commit()
                return preset
        _, plaintext = await create_key(
            session, name=BOOTSTRAP_KEY_NAME, role=Role.admin, key=preset
        )
        try:
            await session.commit()
        except IntegrityError:  # another process created the same preset key first
            await session.rollback()
            return None
    return plaintext
