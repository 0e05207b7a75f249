"""Drives a Tollgate gateway with the official Python SDK (mcp 2.3.x) in its default `auto` mode,
which first probes `server/discover` at protocol 2026-07-28 and falls back to `initialize`.

Usage: python client.py <gateway /mcp URL>. Prints one JSON summary line; exits non-zero on failure.
"""

import asyncio
import json
import sys

from mcp.client.client import Client


async def main(url: str) -> None:
    out = {}
    progress = []

    async def on_progress(p, total, message):
        progress.append(p)

    async with asyncio.timeout(60):
        async with Client(url) as client:
            out["protocolVersion"] = client.protocol_version
            tools = await client.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            res = await client.call_tool("echo", {"message": "hi from python"})
            out["echo"] = res.content[0].text
            res = await client.call_tool(
                "trigger-long-running-operation", {"duration": 1, "steps": 3}, progress_callback=on_progress
            )
            out["progress"] = len(progress)
            out["long"] = res.content[0].text
            resources = await client.list_resources()
            out["resourceCount"] = len(resources.resources)
            read = await client.read_resource(resources.resources[0].uri)
            out["readOk"] = str(read.contents[0].uri) == str(resources.resources[0].uri)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
