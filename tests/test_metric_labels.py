"""Label values: a path's endpoint and a status's class, each from a fixed set."""

from __future__ import annotations

import pytest

from edgeproxy.metric_labels import ENDPOINTS, OTHER, endpoint_of, status_class


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "responses"),
        ("/v1/responses/resp_123", "responses"),
        ("/anthropic/v1/messages", "messages"),
        ("/v1/models", "models"),
        ("/v1/models/gpt-4o", "models"),
        ("/v1/audio/transcriptions", "audio"),
        ("/v1/images/generations", "images"),
        ("/v1/files/file-abc/content", "files"),
        ("/openai/deployments/my-gpt/chat/completions", "chat"),
        ("/openai/deployments/my-gpt/embeddings", "embeddings"),
        ("/v1/chat", OTHER),
        ("/v1/fine_tuning/jobs", OTHER),
        ("/v1", OTHER),
        ("/", OTHER),
        ("", OTHER),
        ("/admin/keys", OTHER),
    ],
)
def test_endpoint_of(path: str, endpoint: str) -> None:
    assert endpoint_of(path) == endpoint
    assert endpoint in ENDPOINTS


@pytest.mark.parametrize(
    ("status", "label"), [(200, "2xx"), (204, "2xx"), (301, "3xx"), (429, "4xx"), (499, "4xx"), (503, "5xx"),
                          (0, OTHER), (600, OTHER)]
)  # fmt: skip
def test_status_class(status: int, label: str) -> None:
    assert status_class(status) == label
