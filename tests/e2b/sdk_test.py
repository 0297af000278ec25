"""The unmodified e2b Python SDK against agentbox's E2B facade.

Run by tests/integration/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
pointing at a test daemon's TCP listener that has the template `mini` (busybox: sh, no
bash; default user `user`, uid 1000). Each section creates its own sandboxes and kills
them. `python3 sdk_test.py [SECTION...]` runs the named sections (default: all) and
prints one line per check; any failure raises (non-zero exit).
"""

import io
import os
import sys
import time
import uuid

import httpx

from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

TEMPLATE = "mini"
RUN = uuid.uuid4().hex[:8]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok   {what}", flush=True)


def raises(exc, fn, what):
    try:
        fn()
    except exc as e:
        print(f"ok   {what} ({type(e).__name__})", flush=True)
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing raised")


def new(**kw):
    kw.setdefault("timeout", 300)
    return Sandbox.create(TEMPLATE, **kw)


# (1) create, kill, is_running, get_info, set_timeout, list with metadata and paging
def test_lifecycle():
    tag = f"life-{RUN}"
    t0 = time.time()
    sb = new(timeout=120, metadata={"suite": tag, "role": "main"}, envs={"GREETING": "hello e2b"})
    check(len(sb.sandbox_id) > 0, f"create: id {sb.sandbox_id} in {time.time() - t0:.2f}s")
    check(sb.is_running(), "is_running() of a new sandbox")
    info = sb.get_info()
    check(info.sandbox_id == sb.sandbox_id and info.template_id == TEMPLATE, "get_info: id and template")
    check(info.metadata == {"suite": tag, "role": "main"}, f"get_info: metadata {info.metadata}")
    check(info.state == SandboxState.RUNNING, "get_info: state running")
    life = (info.end_at - info.started_at).total_seconds()
    check(115 <= life <= 125, f"get_info: end_at - started_at = {life}s for timeout=120")
    check(info.envd_version == "0.5.7" and info.cpu_count >= 1 and info.memory_mb > 0, "get_info: envd version, cpus, memory")
    r = sb.commands.run("echo $GREETING")
    check(r.stdout == "hello e2b\n", f"envs of the sandbox reach commands: {r.stdout!r}")

    sb.set_timeout(600)
    life = (sb.get_info().end_at - info.started_at).total_seconds()
    check(590 <= life <= 620, f"set_timeout(600): end_at moved ({life}s)")
    check(Sandbox.get_info(sb.sandbox_id).sandbox_id == sb.sandbox_id, "Sandbox.get_info(id)")

    others = [new(metadata={"suite": tag, "role": f"other{i}"}) for i in range(2)]
    stranger = new(metadata={"suite": f"other-{RUN}"})
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
    ids = {s.sandbox_id for s in found}
    check(ids == {sb.sandbox_id} | {o.sandbox_id for o in others}, "list: metadata filter")
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "role": "other1"})).next_items()
    check([s.sandbox_id for s in found] == [others[1].sandbox_id], "list: filter on two metadata keys")
    pager = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), limit=2)
    pages = []
    while pager.has_next:
        pages.append([s.sandbox_id for s in pager.next_items()])
    check([len(p) for p in pages] == [2, 1], f"list: paging by 2 gives pages {[len(p) for p in pages]}")
    check({i for p in pages for i in p} == ids, "list: pages hold every sandbox once")
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])).next_items()
    check(found == [], "list: state filter (none paused)")
    check(all(s.state == SandboxState.RUNNING for s in Sandbox.list().next_items()), "list: states")

    asc = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), order="asc").next_items()]
    desc = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), order="desc").next_items()]
    check(len(asc) == 3 and desc == asc[::-1], "list: order='asc' / 'desc'")
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, template=TEMPLATE)).next_items()
    check(len(found) == 3, "list: template filter")
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, template="base")).next_items()
    check(found == [], "list: template filter (other template)")
    later = info.started_at.timestamp() + 3600
    import datetime as _dt
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, started_after=_dt.datetime.fromtimestamp(later, _dt.timezone.utc))).next_items()
    check(found == [], "list: started_after")

    same = Sandbox.connect(sb.sandbox_id)
    check(same.commands.run("echo again").stdout == "again\n", "Sandbox.connect(id) to a running sandbox")

    check(sb.kill() is True, "kill()")
    check(not sb.is_running(), "is_running() after kill")
    check(Sandbox.kill(sb.sandbox_id) is False, "Sandbox.kill(id) of a killed sandbox is False")
    raises(NotFoundException, lambda: Sandbox.get_info(sb.sandbox_id), "get_info of a killed sandbox")
    raises(SandboxException, lambda: sb.commands.run("true"), "commands on a killed sandbox")
    for s in others + [stranger]:
        Sandbox.kill(s.sandbox_id)

    offline = new(allow_internet_access=False)
    check(offline.get_info().allow_internet_access is False, "allow_internet_access=False")
    offline.update_network({"allow_out": ["example.com"], "deny_out": ["0.0.0.0/0"]})
    net = offline.get_info().network
    check(net["allow_out"] == ["example.com"] and net["deny_out"] == ["0.0.0.0/0"], f"update_network: {net}")
    offline.update_network({})
    check(offline.get_info().allow_internet_access is True, "update_network: the internet again")
    offline.kill()

    sleepy = new(timeout=2, lifecycle={"on_timeout": "pause"})
    sleepy.files.write("/home/user/kept.txt", "kept")
    deadline = time.time() + 15
    while sleepy.get_info().state != SandboxState.PAUSED and time.time() < deadline:
        time.sleep(0.2)
    check(sleepy.get_info().state == SandboxState.PAUSED, "lifecycle on_timeout=pause: paused at its timeout")
    sleepy.connect(timeout=60)
    check(sleepy.files.read("/home/user/kept.txt") == "kept", "lifecycle on_timeout=pause: connect() boots it with its files")
    sleepy.kill()

    key = os.environ["E2B_API_KEY"]
    vol = f"vol-{RUN}"
    r = httpx.post(os.environ["E2B_API_URL"] + "/v1/volumes", json={"name": vol}, headers={"Authorization": f"Bearer {key}"})
    check(r.status_code == 201, f"an agentbox volume (over the same listener): {r.status_code}")
    v1 = new(volume_mounts={"/data": vol})
    v1.files.write("/data/shared.txt", "via volume")
    v2 = new(volume_mounts={"/mnt/v": vol})
    check(v2.files.read("/mnt/v/shared.txt") == "via volume", "volume_mounts by name")
    check(v2.get_info().volume_mounts == [{"name": vol, "path": "/mnt/v"}], "get_info: volume_mounts")
    v1.kill()
    v2.kill()
    e = raises(SandboxException, lambda: Sandbox.create("no-such-template-" + RUN), "create from an unknown template")
    check("404" in str(e) and "not found" in str(e), f"unknown template: {e}")
    raises(AuthenticationException, lambda: Sandbox.create(TEMPLATE, api_key="e2b_" + "0" * 40), "a wrong API key")


# (2) commands
def test_commands():
    sb = new()
    try:
        out, err, stamps = [], [], []
        t0 = time.time()
        r = sb.commands.run(
            "echo one; echo uno >&2; sleep 1; echo two",
            on_stdout=lambda s: (out.append(s), stamps.append(time.time() - t0)),
            on_stderr=err.append,
        )
        check(r.exit_code == 0 and r.stdout == "one\ntwo\n" and r.stderr == "uno\n", f"run: result {r}")
        check("".join(out) == "one\ntwo\n" and "".join(err) == "uno\n", "run: on_stdout / on_stderr")
        check(stamps[0] < 0.8 and stamps[-1] >= 0.9, f"run: output streams as it comes ({stamps})")

        e = raises(CommandExitException, lambda: sb.commands.run("echo bad >&2; exit 3"), "non-zero exit")
        check(e.exit_code == 3 and e.stderr == "bad\n", f"CommandExitException: code {e.exit_code}, stderr {e.stderr!r}")

        check(sb.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n", "run: cwd")
        check(sb.commands.run("pwd").stdout == "/home/user\n", "run: default cwd is the user's home")
        check(sb.commands.run("echo $A-$B", envs={"A": "1", "B": "2"}).stdout == "1-2\n", "run: envs")
        check(sb.commands.run("id -u").stdout == "1000\n", "run: default user is `user`")
        check(sb.commands.run("id -u", user="root").stdout == "0\n", "run: user=root")
        check(sb.commands.run("cat").stdout == "", "run: stdin is empty unless asked for")

        h = sb.commands.run("echo start; sleep 0.5; echo end", background=True)
        check(h.pid > 0, f"background: pid {h.pid}")
        r = h.wait()
        check(r.stdout == "start\nend\n", "background: wait() collects the output")

        h = sb.commands.run("sleep 30", background=True)
        procs = sb.commands.list()
        check(any(p.pid == h.pid for p in procs), f"commands.list() shows the background process ({[p.pid for p in procs]})")
        p = next(p for p in procs if p.pid == h.pid)
        check(p.cmd in ("/bin/bash", "/bin/sh") and p.args[-1] == "sleep 30", f"commands.list(): cmd {p.cmd} {p.args}")
        check(h.kill() is True, "background: kill()")
        e = raises(CommandExitException, h.wait, "wait() of a killed process")
        check(e.exit_code == -1, f"killed process exit code {e.exit_code}")
        check(all(p.pid != h.pid for p in sb.commands.list()), "commands.list() after kill")
        check(sb.commands.kill(999999) is False, "kill() of an unknown pid is False")

        h = sb.commands.run("read line; echo got $line", background=True, stdin=True)
        sb.commands.send_stdin(h.pid, "hello\n")
        check(h.wait().stdout == "got hello\n", "send_stdin")
        h = sb.commands.run("cat; echo EOF", background=True, stdin=True)
        h.send_stdin("abc")
        h.close_stdin()
        check(h.wait().stdout == "abcEOF\n", "close_stdin")
        h = sb.commands.run("cat", background=True, stdin=True)
        sb.commands.stream_input(h.pid, ["x\n", b"y\n"])
        sb.commands.close_stdin(h.pid)
        check(h.wait().stdout == "x\ny\n", "stream_input")

        h = sb.commands.run("sleep 300", background=True)
        h.disconnect()
        time.sleep(0.2)
        check(any(p.pid == h.pid for p in sb.commands.list()), "disconnect() leaves the process running")
        check(sb.commands.kill(h.pid), "kill() of a detached process")

        h = sb.commands.run("sleep 1; echo done", background=True)
        again = sb.commands.connect(h.pid)
        check(again.wait().stdout == "done\n", "commands.connect(pid)")
        h.disconnect()

        raises(TimeoutException, lambda: sb.commands.run("sleep 20", timeout=1), "run(timeout=1) of a longer command")
        time.sleep(0.3)
        check(all("sleep 20" not in " ".join(p.args) for p in sb.commands.list()), "the timed out command was killed")
    finally:
        sb.kill()


# (3) files
def test_files():
    sb = new()
    try:
        info = sb.files.write("/tmp/hello.txt", "hello world")
        check(info.path == "/tmp/hello.txt" and info.name == "hello.txt" and info.type == FileType.FILE, f"write: {info}")
        check(sb.files.read("/tmp/hello.txt") == "hello world", "read text")
        data = bytes(range(256)) * 64
        sb.files.write("/tmp/bin", data)
        check(bytes(sb.files.read("/tmp/bin", format="bytes")) == data, "write and read bytes")
        big = os.urandom(3 << 20)
        sb.files.write("/tmp/big", io.BytesIO(big))
        check(bytes(sb.files.read("/tmp/big", format="bytes")) == big, "3 MiB from a file object (octet-stream upload)")
        stream = sb.files.read("/tmp/big", format="stream")
        check(b"".join(stream) == big, "read as a stream")
        check(sb.commands.run("cat /tmp/hello.txt").stdout == "hello world", "written file seen by commands")

        infos = sb.files.write_files([{"path": "/tmp/m/a.txt", "data": "A"}, {"path": "/tmp/m/sub/b.txt", "data": b"B"}])
        check([i.path for i in infos] == ["/tmp/m/a.txt", "/tmp/m/sub/b.txt"], "write_files (parents made)")
        check(sb.files.read("/tmp/m/sub/b.txt") == "B", "write_files content")
        sb.files.write("rel.txt", "relative")
        check(sb.commands.run("cat /home/user/rel.txt").stdout == "relative", "relative paths are in the user's home")
        check(sb.commands.run("stat -c %U /tmp/hello.txt").stdout == "user\n", "files belong to the default user")
        sb.files.write("/root/secret", "s", user="root")
        check(sb.files.read("/root/secret", user="root") == "s", "write and read as root")
        raises(SandboxException, lambda: sb.files.read("/root/secret"), "the default user cannot read root's file")

        entries = sb.files.list("/tmp/m")
        check(sorted((e.name, e.type) for e in entries) == [("a.txt", FileType.FILE), ("sub", FileType.DIR)], "list")
        deep = sb.files.list("/tmp/m", depth=2)
        check(sorted(e.path for e in deep) == ["/tmp/m/a.txt", "/tmp/m/sub", "/tmp/m/sub/b.txt"], "list depth=2")

        check(sb.files.exists("/tmp/hello.txt") and not sb.files.exists("/tmp/nope"), "exists")
        check(sb.files.make_dir("/tmp/d/e/f") is True, "make_dir (with parents)")
        check(sb.files.make_dir("/tmp/d/e/f") is False, "make_dir of an existing directory is False")
        check(sb.files.get_info("/tmp/d/e/f").type == FileType.DIR, "made directory exists")

        gi = sb.files.get_info("/tmp/hello.txt")
        check(gi.size == 11 and gi.type == FileType.FILE and gi.permissions == "-rw-r--r--", f"get_info: {gi}")
        check(gi.owner == "user" and gi.group == "user" and gi.mode == 0o644, "get_info: owner, group, mode")
        check(abs(gi.modified_time.timestamp() - time.time()) < 60, "get_info: modified time")

        moved = sb.files.rename("/tmp/hello.txt", "/tmp/d/moved.txt")
        check(moved.path == "/tmp/d/moved.txt", "rename")
        check(not sb.files.exists("/tmp/hello.txt") and sb.files.read("/tmp/d/moved.txt") == "hello world", "rename moved it")

        sb.files.remove("/tmp/d/moved.txt")
        check(not sb.files.exists("/tmp/d/moved.txt"), "remove a file")
        sb.files.remove("/tmp/d")
        check(not sb.files.exists("/tmp/d"), "remove a directory tree")
        raises(FileNotFoundException, lambda: sb.files.read("/tmp/nope"), "read a missing file")
        raises(FileNotFoundException, lambda: sb.files.get_info("/tmp/nope"), "get_info of a missing file")

        url = sb.download_url("/tmp/m/a.txt")
        check(httpx.get(url).content == b"A", "download_url (signed, no headers)")
        up = sb.upload_url("/tmp/up.txt")
        r = httpx.post(up, files={"file": ("up.txt", b"uploaded")})
        check(r.status_code == 200 and sb.files.read("/tmp/up.txt") == "uploaded", "upload_url (signed multipart)")
        check(httpx.get(url + "x").status_code == 401, "a bad signature is refused")
        url = sb.download_url("/tmp/m/a.txt", use_signature_expiration=60)
        check(httpx.get(url).content == b"A", "download_url with an expiry")
        url = sb.download_url("/tmp/m/a.txt", use_signature_expiration=-10)
        check(httpx.get(url).status_code == 401, "an expired signature is refused")
        r = httpx.get(
            os.environ["E2B_SANDBOX_URL"] + "/files",
            params={"path": "/tmp/m/a.txt"},
            headers={"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": "abx_wrong"},
        )
        check(r.status_code == 401, "a wrong access token is refused")
    finally:
        sb.kill()


# (4) pause, connect (resume), metrics
def test_pause():
    sb = new(metadata={"suite": f"pause-{RUN}"})
    try:
        h = sb.commands.run("sleep 300", background=True)
        sb.files.write("/tmp/state", "kept")
        check(sb.pause() is True, "pause()")
        check(sb.get_info().state == SandboxState.PAUSED, "get_info: paused")
        check(not sb.is_running(), "is_running() of a paused sandbox")
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": f"pause-{RUN}"}, state=[SandboxState.PAUSED])).next_items()
        check([s.sandbox_id for s in listed] == [sb.sandbox_id], "list: paused state filter")
        check(sb.pause() is False, "pause() of a paused sandbox is False")
        again = Sandbox.connect(sb.sandbox_id, timeout=400)
        check(again.is_running() and sb.get_info().state == SandboxState.RUNNING, "connect() resumes")
        check(any(p.pid == h.pid for p in again.commands.list()), "processes survive pause (memory kept)")
        check(again.files.read("/tmp/state") == "kept", "files survive pause")

        check(sb.pause(mode="filesystem") is True, "pause(mode='filesystem')")
        check(sb.get_info().state == SandboxState.PAUSED, "filesystem pause: paused")
        sb.connect()
        check(sb.is_running() and sb.files.read("/tmp/state") == "kept", "connect() after a filesystem pause: files kept")
        check(all(p.pid != h.pid for p in sb.commands.list()), "filesystem pause: processes gone")

        sb.commands.run("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
        m = sb.get_metrics()
        check(len(m) == 1 and m[0].mem_used > 0 and m[0].cpu_count >= 1 and m[0].cpu_used_pct > 0, f"get_metrics: {m}")
    finally:
        sb.kill()


# (5) pty, watch_dir
def test_pty_watch():
    sb = new()
    try:
        out = bytearray()
        h = sb.pty.create(PtySize(rows=24, cols=80))
        sb.pty.send_stdin(h.pid, b"echo hi-$((40+2))\n")
        sb.pty.resize(h.pid, PtySize(rows=30, cols=100))
        sb.pty.send_stdin(h.pid, b"stty size\n")
        sb.pty.send_stdin(h.pid, b"exit\n")
        r = h.wait(on_pty=out.extend)
        text = out.decode(errors="replace")
        check(r.exit_code == 0 and "hi-42" in text, f"pty: output {text[-120:]!r}")
        check("30 100" in text, "pty: resize")
        h = sb.pty.create(PtySize(rows=24, cols=80))
        again = sb.pty.connect(h.pid)
        sb.pty.send_stdin(h.pid, b"echo via-$((1+1))\n")
        seen = bytearray()
        for _, _, chunk in again:
            seen.extend(chunk or b"")
            if b"via-2" in seen:
                break
        check(b"via-2" in seen, "pty.connect(pid)")
        again.disconnect()
        check(sb.pty.kill(h.pid) is True, "pty.kill()")
        raises(CommandExitException, h.wait, "wait() of a killed pty")

        sb.files.make_dir("/tmp/w")
        w = sb.files.watch_dir("/tmp/w")
        sb.files.write("/tmp/w/new.txt", "x")
        sb.commands.run("mkdir /tmp/w/sub")
        ev = w.get_new_events()
        kinds = {(e.name, e.type) for e in ev}
        check(("new.txt", FilesystemEventType.CREATE) in kinds and ("sub", FilesystemEventType.CREATE) in kinds, f"watch_dir: creates {kinds}")
        sb.files.write("/tmp/w/new.txt", "longer")
        sb.files.remove("/tmp/w/sub")
        kinds = {(e.name, e.type) for e in w.get_new_events()}
        check(("new.txt", FilesystemEventType.WRITE) in kinds and ("sub", FilesystemEventType.REMOVE) in kinds, f"watch_dir: write and remove {kinds}")
        check(w.get_new_events() == [], "watch_dir: nothing new")
        w.stop()
        rw = sb.files.watch_dir("/tmp/w", recursive=True)
        sb.files.write("/tmp/w/a/b/deep.txt", "d")
        kinds = {(e.name, e.type) for e in rw.get_new_events()}
        check(("a/b/deep.txt", FilesystemEventType.CREATE) in kinds, f"watch_dir(recursive=True) {kinds}")
        rw.stop()
        raises(SandboxException, lambda: w.get_new_events(), "a stopped watcher")
    finally:
        sb.kill()


# (6) snapshots, create from a snapshot, fork
def test_snapshots():
    sb = new()
    made = []
    try:
        sb.files.write("/home/user/work.txt", "v1")
        snap = sb.create_snapshot()
        check(len(snap.snapshot_id) > 0, f"create_snapshot: {snap}")
        sb.files.write("/home/user/work.txt", "v2")
        clone = Sandbox.create(snap.snapshot_id, timeout=120)
        made.append(clone)
        check(clone.files.read("/home/user/work.txt") == "v1", "create from a snapshot has its files")
        check(clone.commands.run("id -un").stdout == "user\n", "create from a snapshot: default user")
        named = sb.create_snapshot(name=f"snap-{RUN}")
        check(named.names == [f"snap-{RUN}"], f"create_snapshot(name=): {named.names}")
        listed = [s.snapshot_id for s in sb.list_snapshots().next_items()]
        check(snap.snapshot_id in listed and named.snapshot_id in listed, "list_snapshots() of the sandbox")
        check(Sandbox.delete_snapshot(snap.snapshot_id) is True, "delete_snapshot")
        check(Sandbox.delete_snapshot(snap.snapshot_id) is False, "delete_snapshot of a deleted snapshot is False")
        Sandbox.delete_snapshot(named.snapshot_id)

        forks = sb.fork(count=2)
        made.extend(f for f in forks if isinstance(f, Sandbox))
        check(len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks), f"fork(count=2): {forks}")
        check(all(f.files.read("/home/user/work.txt") == "v2" for f in forks), "forks have the files")
        check(len({f.sandbox_id for f in forks} | {sb.sandbox_id}) == 3, "forks are new sandboxes")
    finally:
        for s in made:
            s.kill()
        sb.kill()


# Authentication of the control plane (API key) and of envd (the sandbox's access token)
def test_auth():
    url = os.environ["E2B_SANDBOX_URL"]
    a, b = new(), new()
    try:
        tok_a = a._envd_access_token
        check(tok_a and tok_a != b._envd_access_token, "each sandbox has its own access token")
        h = {"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983"}
        check(httpx.get(url + "/health", headers={**h, "X-Access-Token": tok_a}).status_code == 204, "health with the token")
        check(httpx.get(url + "/health", headers=h).status_code == 401, "health without a token")
        rpc = {**h, "Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        r = httpx.post(url + "/process.Process/List", headers=rpc, content=b"{}")
        check(r.status_code == 401, "an RPC without a token")
        r = httpx.post(url + "/process.Process/List", headers={**rpc, "X-Access-Token": b._envd_access_token}, content=b"{}")
        check(r.status_code == 401, "another sandbox's token")
        r = httpx.post(url + "/process.Process/List", headers={**rpc, "X-Access-Token": tok_a}, content=b"{}")
        check(r.status_code == 200 and "processes" in r.json(), f"an RPC with the token: {r.text}")
        r = httpx.get(url + "/v1/system", headers=h)
        check(r.status_code == 401, "a sandbox header does not open the daemon's own API")
        r = httpx.get(url + "/v2/sandboxes", headers=h)
        check(r.status_code == 401, "nor the control plane")
        # Another port of the sandbox (get_host(port) or the headers) is the ingress proxy's:
        # a 502 that says so, on any path, not a 401 asking for an API key.
        other = {"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "8000"}
        for path, headers in [("/", other), ("/index.html", {"Host": f"8000-{a.sandbox_id}.e2b.test"}), ("/health", other)]:
            r = httpx.get(url + path, headers=headers)
            check(r.status_code == 502 and "ingress" in r.json().get("message", ""), f"port 8000 at {path}: {r.status_code} {r.text}")
        r = httpx.get(url + f"/sandboxes/{a.sandbox_id}", headers={"X-API-Key": "e2b_" + "1" * 40})
        check(r.status_code == 401 and r.json().get("code") == 401, "a wrong API key: 401 in E2B's error shape")
        # allow_public_traffic=False: the sandbox's ports need its traffic access token.
        check(a.traffic_access_token is None, "ports are public by default: no traffic token")
        c = new(network={"allow_public_traffic": False})
        try:
            tok = c.traffic_access_token
            check(tok and len(tok) == 40 and tok != a.traffic_access_token, f"a traffic access token: {tok}")
            r = httpx.get(url + f"/sandboxes/{c.sandbox_id}", headers={"X-API-Key": os.environ["E2B_API_KEY"]})
            net = r.json().get("network", {})
            check(net.get("allowPublicTraffic") is False and r.json().get("trafficAccessToken") == tok, f"detail: {r.text}")
        finally:
            c.kill()
    finally:
        a.kill()
        b.kill()


# The async SDK: same protocols on asyncio (streaming directory watch with WatchDir)
def test_async():
    import asyncio

    from e2b import AsyncSandbox

    async def main():
        sb = await AsyncSandbox.create(TEMPLATE, timeout=120)
        try:
            out = []
            r = await sb.commands.run("echo a; sleep 0.2; echo b", on_stdout=out.append)
            check(r.stdout == "a\nb\n" and "".join(out) == "a\nb\n", "async: commands.run")
            await sb.files.write("/tmp/x.txt", "async")
            check(await sb.files.read("/tmp/x.txt") == "async", "async: files")
            await sb.files.make_dir("/tmp/aw")
            events = []
            handle = await sb.files.watch_dir("/tmp/aw", on_event=events.append)
            await sb.files.write("/tmp/aw/f.txt", "1")
            for _ in range(50):
                if any(e.name == "f.txt" and e.type == FilesystemEventType.CREATE for e in events):
                    break
                await asyncio.sleep(0.1)
            check(any(e.name == "f.txt" and e.type == FilesystemEventType.CREATE for e in events), f"async: watch_dir stream {events}")
            await handle.stop()
            h = await sb.commands.run("sleep 30", background=True)
            check(await sb.commands.kill(h.pid), "async: background kill")
            check(await sb.is_running(), "async: is_running")
        finally:
            await sb.kill()
        check(not await sb.is_running(), "async: kill")

    asyncio.run(main())


SECTIONS = {
    "lifecycle": test_lifecycle,
    "commands": test_commands,
    "files": test_files,
    "pause": test_pause,
    "pty_watch": test_pty_watch,
    "snapshots": test_snapshots,
    "async": test_async,
    "auth": test_auth,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for n in names:
        t0 = time.time()
        print(f"== {n}", flush=True)
        SECTIONS[n]()
        print(f"== {n} passed in {time.time() - t0:.1f}s", flush=True)
    print("ALL PASSED", flush=True)
