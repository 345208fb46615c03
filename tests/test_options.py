"""parse_options: the shortcut for requests without gateway headers gives exactly what the full parse gives."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from edgeproxy.errors import GatewayError
from edgeproxy.options import RequestOptions, parse_options

REQUEST_ID = "00000000-0000-4000-8000-000000000001"
PLAIN = {"Host": "127.0.0.1", "Content-Type": "application/json", "Authorization": "Bearer sk-x",
         "Cache-Control": "max-age=60"}


def test_without_gateway_headers_the_options_are_the_full_parse_of_empty_ones() -> None:
    shortcut = parse_options(CIMultiDict(PLAIN), REQUEST_ID)
    # An empty user id sends the same request down the full parse.
    full = parse_options(CIMultiDict({**PLAIN, "Helicone-User-Id": ""}), REQUEST_ID)
    assert shortcut == full == RequestOptions(request_id=REQUEST_ID)
    assert shortcut.cache is None  # Cache-Control alone does not turn caching on


@pytest.mark.parametrize("name", ["helicone-cache-enabled", "HELICONE-CACHE-ENABLED", "Helicone-Cache-Enabled"])
def test_gateway_headers_are_found_in_any_case(name: str) -> None:
    options = parse_options(CIMultiDict({**PLAIN, name: "true"}), REQUEST_ID)
    assert options.cache is not None and options.cache.ttl_seconds == 60


def test_a_lone_bad_gateway_header_is_still_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        parse_options(CIMultiDict({**PLAIN, "helicone-retry-num": "many"}), REQUEST_ID)
    assert (caught.value.status, caught.value.param) == (400, "Helicone-Retry-Num")
