"""EmbeddedServer's request bodies: every compressed frame of an insert is read, none dropped."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import lz4.frame
import pytest
from backports import zstd

from edgeproxy.logs.embedded_server import decompress

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lz4.frame.compress,
    "deflate": zlib.compress,
    "gzip": gzip.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
def test_frames_back_to_back_are_all_decoded(encoding: str) -> None:
    # clickhouse-connect compresses each Native block of an insert as a frame of its own.
    blocks = [bytes([n]) * 5000 for n in range(1, 4)]
    body = b"".join(COMPRESSORS[encoding](block) for block in blocks)
    assert decompress(body, encoding) == b"".join(blocks)


@pytest.mark.parametrize("encoding", ["lz4", "deflate"])
def test_a_body_cut_inside_a_frame_is_refused(encoding: str) -> None:
    body = COMPRESSORS[encoding](b"x" * 5000) + COMPRESSORS[encoding](bytes(range(256)) * 20)
    with pytest.raises(ValueError, match="ends inside a compressed frame"):
        decompress(body[:-4], encoding)


def test_plain_and_unknown_encodings() -> None:
    assert decompress(b"raw", "") == b"raw"
    assert decompress(b"raw", "identity") == b"raw"
    with pytest.raises(ValueError, match="unsupported Content-Encoding br"):
        decompress(b"raw", "br")
