"""The aiohttp floor: a reverse proxy on aiohttp's server and client doing nothing else.

What any gateway built on aiohttp pays per request before a feature of its own: read the
body, send it upstream on a pooled session, relay the answer (SSE chunk by chunk). It is a
reference for `bench.instructions`, not a contender: it has no timeouts, errors or headers of
its own. `python -m bench.floor_proxy --port 8788 --upstream http://127.0.0.1:9999`
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
# What the client sent that the upstream needs; everything else the floor leaves out.
FORWARDED = ("Content-Type", "Authorization")


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(request.method, url, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def command(port: int, upstream: str) -> list[str]:
    """The command line that runs the floor on `port` in front of `upstream`."""
    return [sys.executable, "-m", "bench.floor_proxy", "--port", str(port), "--upstream", upstream]


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the provider, e.g. http://127.0.0.1:9999")
    args = parser.parse_args(argv)
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
