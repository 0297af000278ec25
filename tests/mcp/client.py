"""An MCP client session against agentbox's MCP server, with the official Python SDK.

    client.py stdio AGENTBOX_BIN HOST   spawn `agentbox --host HOST mcp` and talk over stdio
    client.py http URL                  talk streamable HTTP to URL (…/mcp)

Drives every tool on a `mini` sandbox and checks the results; exits non-zero (with a
traceback) at the first surprise. Prints `ok <transport>` at the end.
"""

import base64
import json
import secrets
import sys

import anyio
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

TOOLS = {
    "create_sandbox",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
    "snapshot",
    "list_snapshots",
    "fork",
    "rollback",
    "diff",
    "destroy_sandbox",
    "list_sandboxes",
}

DIR = "/home/user/proj"


class Session:
    def __init__(self, session: ClientSession):
        self.s = session

    async def call(self, name: str, args: dict) -> dict:
        """A tool call that must succeed; its structured result."""
        res = await self.s.call_tool(name, args)
        text = "".join(c.text for c in res.content if c.type == "text")
        assert not res.is_error, f"{name}({args}) failed: {text}"
        assert res.structured_content is not None, f"{name}: no structured content"
        assert json.loads(text) == res.structured_content, f"{name}: text and structured content differ"
        return res.structured_content

    async def fails(self, name: str, args: dict) -> str:
        """A tool call that must come back as a tool error (isError), not a protocol error."""
        res = await self.s.call_tool(name, args)
        text = "".join(c.text for c in res.content if c.type == "text")
        assert res.is_error, f"{name}({args}) should fail, got {text}"
        return text


async def flow(session: ClientSession, full: bool) -> None:
    init = await session.initialize()
    assert init.server_info.name == "agentbox", init.server_info
    assert init.capabilities.tools is not None
    listed = (await session.list_tools()).tools
    names = {t.name for t in listed}
    assert TOOLS <= names, f"missing tools: {TOOLS - names}"
    for t in listed:
        assert t.description and len(t.description) > 20, f"{t.name}: no description"
        assert t.input_schema.get("type") == "object", t.input_schema
    run_schema = next(t for t in listed if t.name == "run_command").input_schema
    assert run_schema["required"] == ["sandbox"], run_schema
    assert "command" in run_schema["properties"] and "argv" in run_schema["properties"]

    s = Session(session)
    suffix = secrets.token_hex(4)

    sb = await s.call("create_sandbox", {"template": "mini", "name": f"mcp-{suffix}", "timeout_secs": 600,
                                         "env": {"GREETING": "hello"}, "memory_mb": 256})
    sid = sb["id"]
    assert sb["state"] == "running" and sb["name"] == f"mcp-{suffix}", sb
    assert sb["limits"]["memory_bytes"] == 256 << 20, sb

    r = await s.call("run_command", {"sandbox": sid, "command": "echo hi"})
    assert r == {"exit_code": 0, "stdout": "hi\n", "stderr": ""}, r
    # A size that overflows in bytes is an error, not a wrapped-around small limit.
    msg = await s.fails("create_sandbox", {"template": "mini", "memory_mb": 17592186044928})
    assert "too large" in msg, msg

    if full:
        r = await s.call("run_command", {"sandbox": f"mcp-{suffix}",
                                         "argv": ["sh", "-c", "echo $GREETING $X; echo oops >&2; exit 3"],
                                         "env": {"X": "there"}})
        assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "hello there\n", "oops\n"), r
        r = await s.call("run_command", {"sandbox": sid, "command": "pwd; id -un", "cwd": "/tmp", "user": "root"})
        assert r["stdout"] == "/tmp\nroot\n", r
        r = await s.call("run_command", {"sandbox": sid, "command": "tr a-z A-Z", "stdin": "piped\n"})
        assert r["stdout"] == "PIPED\n", r
        # 3 MB of output: cut to 1 MiB, first and last halves, and said so.
        r = await s.call("run_command", {"sandbox": sid,
                                         "command": "echo START; head -c 3000000 /dev/zero | tr '\\0' a; echo; echo END"})
        assert r.get("stdout_truncated") is True and r["stdout_bytes"] == 3000011, {k: r[k] for k in r if k != "stdout"}
        assert r["stdout"].startswith("START\naaa") and r["stdout"].endswith("aaa\nEND\n")
        assert "bytes omitted" in r["stdout"] and len(r["stdout"]) < (1 << 20) + 100
        r = await s.call("run_command", {"sandbox": sid, "command": "sleep 30", "timeout_secs": 1})
        assert r.get("timed_out") is True and r["exit_code"] != 0, r
        msg = await s.fails("run_command", {"sandbox": sid})
        assert "give command" in msg, msg
        msg = await s.fails("run_command", {"sandbox": sid, "command": "true", "argv": ["true"]})
        assert "not both" in msg, msg

    notes = f"{DIR}/notes.txt"
    w = await s.call("write_file", {"sandbox": sid, "path": notes, "content": "first line\n"})
    assert w["path"] == notes and w["size"] == 11 and w["kind"] == "file", w
    r = await s.call("read_file", {"sandbox": sid, "path": notes})
    assert (r["content"], r["encoding"]) == ("first line\n", "utf-8"), r
    ls = await s.call("list_files", {"sandbox": sid, "path": DIR})
    assert [(e["path"], e["kind"], e["size"]) for e in ls["entries"]] == [(notes, "file", 11)], ls

    if full:
        blob = bytes(range(256))
        w = await s.call("write_file", {"sandbox": sid, "path": f"{DIR}/bin/blob", "mode": "755",
                                        "content": base64.b64encode(blob).decode(), "encoding": "base64"})
        assert w["mode"] == "755" and w["size"] == 256, w
        r = await s.call("read_file", {"sandbox": sid, "path": f"{DIR}/bin/blob"})
        assert r["encoding"] == "base64" and base64.b64decode(r["content"]) == blob, r
        r = await s.call("read_file", {"sandbox": sid, "path": notes, "max_bytes": 5})
        assert (r["content"], r.get("truncated")) == ("first", True), r
        r = await s.call("read_file", {"sandbox": sid, "path": notes, "max_bytes": 0})
        assert (r["content"], r["bytes"], r.get("truncated")) == ("", 0, True), r
        ls = await s.call("list_files", {"sandbox": sid, "path": DIR, "depth": 2})
        assert {e["path"] for e in ls["entries"]} == {notes, f"{DIR}/bin", f"{DIR}/bin/blob"}, ls
        await s.call("run_command", {"sandbox": sid, "argv": ["rm", "-r", f"{DIR}/bin"]})
        msg = await s.fails("read_file", {"sandbox": sid, "path": f"{DIR}/nope"})
        assert "not found" in msg.lower() or "no such file" in msg.lower(), msg

    snap = await s.call("snapshot", {"sandbox": sid, "name": f"mcp-base-{suffix}"})
    assert snap["sandbox"] == sid and snap["name"] == f"mcp-base-{suffix}", snap
    listed = await s.call("list_snapshots", {"sandbox": sid})
    assert [x["id"] for x in listed["snapshots"]] == [snap["id"]], listed

    await s.call("write_file", {"sandbox": sid, "path": f"{DIR}/later.txt", "content": "later\n"})
    await s.call("run_command", {"sandbox": sid, "command": f"echo second >> {notes}"})
    d = await s.call("diff", {"sandbox": sid, "since": snap["id"]})
    assert [e["path"] for e in d["added"]] == [f"{DIR}/later.txt"], d
    assert [e["path"] for e in d["changed"]] == [notes], d
    assert d["deleted"] == [], d

    rb = await s.call("rollback", {"sandbox": sid, "snapshot": f"mcp-base-{suffix}"})
    assert rb["id"] == sid and rb["state"] == "running", rb
    r = await s.call("read_file", {"sandbox": sid, "path": notes})
    assert r["content"] == "first line\n", r
    await s.fails("read_file", {"sandbox": sid, "path": f"{DIR}/later.txt"})
    d = await s.call("diff", {"sandbox": sid, "since": snap["id"]})
    assert d == {"added": [], "changed": [], "deleted": []}, d

    f = await s.call("fork", {"sandbox": sid, "count": 2})
    forks = f["ids"]
    assert len(forks) == 2 and sid not in forks, f
    for fid in forks:
        r = await s.call("run_command", {"sandbox": fid, "command": f"cat {notes}"})
        assert r["stdout"] == "first line\n", r
    if full:
        f = await s.call("fork", {"snapshot": snap["id"]})
        forks += f["ids"]
        assert len(f["ids"]) == 1 and f["snapshot"] == snap["id"], f
        msg = await s.fails("fork", {})
        assert "sandbox or snapshot" in msg, msg

    mine = {sid, *forks}
    listed = await s.call("list_sandboxes", {})
    assert mine <= {x["id"] for x in listed["sandboxes"]}, listed
    for x in mine:
        assert (await s.call("destroy_sandbox", {"sandbox": x})) == {"destroyed": x}
    listed = await s.call("list_sandboxes", {})
    assert not mine & {x["id"] for x in listed["sandboxes"]}, listed

    # agentbox errors are tool errors with the daemon's message.
    msg = await s.fails("run_command", {"sandbox": sid, "command": "echo hi"})
    assert "not found" in msg and sid in msg, msg
    msg = await s.fails("create_sandbox", {"template": f"no-such-template-{suffix}"})
    assert f"no-such-template-{suffix}" in msg, msg
    msg = await s.fails("create_sandbox", {"template": "mini", "network": "sometimes"})
    assert "sometimes" in msg, msg


async def modern(url: str) -> None:
    """The SDK's high-level client, which negotiates the newest (stateless) protocol."""
    async with Client(url) as client:
        assert client.server_info is None or client.server_info.name == "agentbox", client.server_info
        names = {t.name for t in (await client.list_tools()).tools}
        assert TOOLS <= names, names
        res = await client.call_tool("create_sandbox", {"template": "mini"})
        assert not res.is_error, res
        sid = res.structured_content["id"]
        res = await client.call_tool("run_command", {"sandbox": sid, "argv": ["echo", "modern"]})
        assert res.structured_content == {"exit_code": 0, "stdout": "modern\n", "stderr": ""}, res
        res = await client.call_tool("destroy_sandbox", {"sandbox": sid})
        assert not res.is_error, res
        res = await client.call_tool("destroy_sandbox", {"sandbox": sid})
        assert res.is_error and "not found" in res.content[0].text, res
        assert client.protocol_version in MODERN_PROTOCOL_VERSIONS, client.protocol_version


async def main() -> None:
    mode = sys.argv[1]
    with anyio.fail_after(300):
        if mode == "stdio":
            params = StdioServerParameters(command=sys.argv[2], args=["--host", sys.argv[3], "mcp"])
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await flow(session, full=True)
        elif mode == "http":
            async with streamable_http_client(sys.argv[2]) as (read, write), ClientSession(read, write) as session:
                await flow(session, full=False)
            await modern(sys.argv[2])
        else:
            raise SystemExit(f"unknown mode {mode}")
    print(f"ok {mode}")


if __name__ == "__main__":
    anyio.run(main)
