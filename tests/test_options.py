"""parse_options and the URLs it accepts: the shortcut without gateway headers, base URLs without query."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from edgeproxy.errors import GatewayError
from edgeproxy.options import NO_OPTIONS, RequestOptions, parse_options
from edgeproxy.settings import SettingsError
from edgeproxy.settings_loader import load_settings

PLAIN = {"Host": "127.0.0.1", "Content-Type": "application/json", "Authorization": "Bearer sk-x",
         "Cache-Control": "max-age=60"}


def test_without_gateway_headers_the_options_are_the_full_parse_of_empty_ones() -> None:
    shortcut = parse_options(CIMultiDict(PLAIN))
    # An empty user id sends the same request down the full parse.
    full = parse_options(CIMultiDict({**PLAIN, "Helicone-User-Id": ""}))
    assert shortcut == full == RequestOptions()
    assert shortcut is NO_OPTIONS and full is not NO_OPTIONS  # the shortcut builds nothing
    assert shortcut.request_id is None  # the gateway's own id is the exchange's, not the options'
    assert shortcut.cache is None  # Cache-Control alone does not turn caching on


def test_a_request_id_the_client_names_is_kept_in_canonical_form() -> None:
    options = parse_options(CIMultiDict({**PLAIN, "Helicone-Request-Id": " {0B7B3A0E-8C53-4A55-9D43-3F1D4F7F8A11} "}))
    assert options.request_id == "0b7b3a0e-8c53-4a55-9d43-3f1d4f7f8a11"
    assert parse_options(CIMultiDict({**PLAIN, "Helicone-User-Id": "u"})).request_id is None


@pytest.mark.parametrize("name", ["helicone-cache-enabled", "HELICONE-CACHE-ENABLED", "Helicone-Cache-Enabled"])
def test_gateway_headers_are_found_in_any_case(name: str) -> None:
    options = parse_options(CIMultiDict({**PLAIN, name: "true"}))
    assert options.cache is not None and options.cache.ttl_seconds == 60


def test_a_lone_bad_gateway_header_is_still_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        parse_options(CIMultiDict({**PLAIN, "helicone-retry-num": "many"}))
    assert (caught.value.status, caught.value.param) == (400, "Helicone-Retry-Num")


@pytest.mark.parametrize("url", ["http://allowed.example/?x=1", "http://allowed.example/v1?", "http://allowed.example/#top"])
def test_a_target_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    # The request's path is appended to the base: `/?x=1` + `/v1/…` would send it to `/` instead.
    with pytest.raises(GatewayError) as caught:
        parse_options(CIMultiDict({"Helicone-Target-URL": url}))
    assert (caught.value.status, caught.value.param) == (400, "Helicone-Target-URL")


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:9/v1?api=1", "http://127.0.0.1:9/#x", "http://", "https://:443/v1", "http://h:99999"]
)
def test_a_configured_base_url_without_a_host_or_with_a_query_or_fragment_is_refused(tmp_path: Path, base_url: str) -> None:
    config = tmp_path / "edgeproxy.toml"
    config.write_text(f'[targets.local]\nbase_url = "{base_url}"\n')
    with pytest.raises(SettingsError, match="targets.local.base_url"):
        load_settings(config, env={})


@pytest.mark.parametrize("line", ["idle = 0", "first_byte = -1", "total = 0.0", "connect = 0"])
def test_a_timeout_that_is_not_positive_is_refused_by_name(tmp_path: Path, line: str) -> None:
    config = tmp_path / "edgeproxy.toml"
    config.write_text(f"[timeouts]\n{line}\n")
    with pytest.raises(SettingsError, match=f"timeouts.{line.split()[0]} must be a positive number of seconds"):
        load_settings(config, env={})
