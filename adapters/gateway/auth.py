"""Who is calling: a bearer token per role, checked against the configured SHA-256 hashes.

Roles: ``agency`` (home agency counters), ``hospital`` (host hospital desks), ``reviewer``
(the home's review desk), ``ops`` (operators), and ``public`` for a caller without a token. A
route names the roles it admits with :func:`require`; no token → 401 with
``WWW-Authenticate: Bearer``, an unknown token → 401, a valid token of another role → 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.gateway.config import ROLES, TokenConfig, token_matches
from adapters.gateway.problems import Problem

PUBLIC: Final = "public"
"""The role of a caller without a token."""
PERSONAL_DATA_ROLES: Final = frozenset({"agency", "hospital", "reviewer", "ops"})
"""Roles that may see ID numbers and names unmasked in public queries."""

_bearer = HTTPBearer(auto_error=False, description="a role's bearer token")


@dataclass(frozen=True, slots=True)
class Caller:
    """The roles a request's token carries (``{"public"}`` without a token)."""

    roles: frozenset[str]

    @property
    def sees_personal_data(self) -> bool:
        """Whether ID numbers and names are shown to this caller unmasked."""
        return bool(self.roles & PERSONAL_DATA_ROLES)

    @property
    def name(self) -> str:
        """The roles, for logs."""
        return ",".join(sorted(self.roles))


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="xsettle"'}
    )


def identify(tokens: TokenConfig, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """The caller of a request: public without credentials; 401 for a token no role has."""
    if credentials is None:
        return Caller(frozenset({PUBLIC}))
    if credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    roles = frozenset(r for r in ROLES if token_matches(credentials.credentials, tokens.of(r)))
    if not roles:
        raise _unauthorized("the token is not valid for any role of this gateway")
    return Caller(roles)


async def caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Caller:
    """Dependency: the caller (public when no token)."""
    tokens: TokenConfig = request.app.state.tokens
    return identify(tokens, credentials)


def require(*roles: str) -> Callable[..., Awaitable[Caller]]:
    """Dependency admitting only callers with one of ``roles``."""
    wanted = frozenset(roles)

    async def check(who: Caller = Depends(caller)) -> Caller:
        if PUBLIC in who.roles:
            raise _unauthorized(f"this needs a bearer token of role {' or '.join(sorted(wanted))}")
        if not who.roles & wanted:
            raise Problem(
                403,
                "forbidden",
                f"role {who.name} may not do this (needs {' or '.join(sorted(wanted))})",
            )
        return who

    return check
