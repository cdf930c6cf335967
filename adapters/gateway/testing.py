"""Gateways for tests and simulators: fixed tokens per role, a config maker, a started gateway
in this process, and an HTTP client that signs in as a role.

The tokens here are public: they are for the embedded broker and loopback only. A real
gateway's tokens come from ``xsettle gateway --new-token ROLE`` and only their hashes are
configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import httpx

from adapters.directory import Directory
from adapters.gateway.config import ROLES, GatewayConfig, TokenConfig, hash_token
from adapters.gateway.service import Gateway
from bus.settings import BusSettings

TEST_TOKENS: Final = {role: f"xsettle-test-token-{role}" for role in ROLES}
"""One well-known token per role (tests, demo): never for a real gateway."""


def fixed_token_config() -> TokenConfig:
    """The hashes of :data:`TEST_TOKENS`."""
    return TokenConfig(**{role: (hash_token(token),) for role, token in TEST_TOKENS.items()})


def gateway_config(
    province: str,
    bootstrap: str,
    state_dir: Path,
    *,
    settings: BusSettings | None = None,
    port: int = 0,
    review_desk: bool = True,
    **overrides: Any,
) -> GatewayConfig:
    """A gateway on a free loopback port with :data:`TEST_TOKENS`; ``settings`` are the bus
    settings (their bootstrap is replaced)."""
    bus = (settings or BusSettings()).model_copy(update={"bootstrap": bootstrap})
    return GatewayConfig.model_validate(
        {
            "province": province,
            "state_dir": state_dir,
            "http": {"host": "127.0.0.1", "port": port},
            "review_desk": {"enabled": review_desk},
            "tokens": fixed_token_config(),
            "bus": bus,
            "start_attempts": 3,
            "start_backoff_s": 0.5,
            **overrides,
        }
    )


@asynccontextmanager
async def running_gateway(
    config: GatewayConfig, *, directory: Directory | None = None
) -> AsyncIterator[Gateway]:
    """A started gateway, stopped (drained) on exit."""
    gateway = Gateway(config, directory=directory)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def client(gateway: Gateway | str, role: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client of a gateway (or base URL) signed in as ``role`` (None: public)."""
    base = gateway if isinstance(gateway, str) else gateway.url
    headers = dict(kwargs.pop("headers", {}) or {})
    if role is not None:
        headers["Authorization"] = f"Bearer {TEST_TOKENS[role]}"
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=30.0, **kwargs)
