"""Property-based fuzzing of the gateway's OpenAPI (schemathesis): for every operation,
generated requests (valid and invalid) must never get a 5xx, and every response must match
what the OpenAPI document says: its status code is documented, its content type and body fit
the schema. It runs against a real gateway pair on the embedded broker, signed in as the
role the operation is for, and again without a token.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapters.gateway.service import Gateway
from adapters.gateway.testing import TEST_TOKENS, gateway_config, running_gateway
from bus.broker import create_contract_topics
from bus.settings import BusSettings
from tests.test_gateway_hospital import file_person

pytestmark = [
    pytest.mark.broker,
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = 40
"""Generated requests per operation and role."""
ROLE_OF_TAG = {
    "hospital desk": "hospital",
    "agency": "agency",
    "review desk": "reviewer",
    "ops": "ops",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
async def gateways(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    await create_contract_topics(settings, broker, ["130000", "460000"])
    state = tmp_path_factory.mktemp("fuzz")
    home_cfg = gateway_config("130000", broker, state, settings=settings)
    host_cfg = gateway_config("460000", broker, state, settings=settings)
    async with running_gateway(home_cfg) as home, running_gateway(host_cfg) as host:
        await asyncio.gather(home.system.node.wait_ready(60), host.system.node.wait_ready(60))
        await file_person(home, host, "130102195203151234")
        yield home, host


def fuzz(url: str) -> Counter[str]:
    """Every operation of the gateway at ``url``, with its role's token and without; returns
    responses by status code. Raises on the first response that breaks a check."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    seen: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # Err raises: the schema is ours
        tags = operation.definition.raw.get("tags", [])
        role = next((ROLE_OF_TAG[t] for t in tags if t in ROLE_OF_TAG), None)
        headers_choices: list[dict[str, str]] = [{}]
        if role is not None:
            headers_choices.append({"Authorization": f"Bearer {TEST_TOKENS[role]}"})

        cases = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases, headers=st.sampled_from(headers_choices))
        def check(case: Any, headers: dict[str, str]) -> None:
            generated = dict(case.headers or {})
            generated.pop("Authorization", None)  # the security scheme's random bearer value
            case.headers = {**generated, **headers}
            response = case.call(base_url=url, timeout=30)
            seen[f"{response.status_code}"] += 1
            case.validate_response(response, checks=CHECKS)

        check()
    return seen


@pytest.mark.timeout(600)
async def test_no_5xx_and_no_response_contradicts_the_schema(
    gateways: tuple[Gateway, Gateway],
) -> None:
    home, host = gateways
    for gateway in (host, home):
        seen = await asyncio.to_thread(fuzz, gateway.url)
        assert sum(seen.values()) > 0
        assert not [code for code in seen if code.startswith("5")]
        print(f"\n{gateway.config.province}: responses by status {dict(sorted(seen.items()))}")  # noqa: T201
