#!/usr/bin/env python3
"""Randomised concurrent operations against one agentbox daemon, through the CLI.

Usage: soak.py AGENTBOX HOST SECONDS WORKLOAD [WORKLOAD...]   (run by scripts/soak)

Workloads (all at once when several are given; at least 6 client threads, one per workload or more):
  lifecycle  create, exec, snapshot, fork, rollback, pause, resume, stop, start, diff,
             cp, timeout, policy changes, pool size changes, removal
  network    sandboxes serving HTTP on port 8000 reached through the ingress proxy,
             DNS lookups through the proxy, policy changes, `net test`, removal
  templates  Dockerfile builds, creates from them (content checked), template rm, tag,
             prune, pools and volumes coming and going
  tenants    two tenants' keys over TCP creating, snapshotting, forking, listing and
             removing, and trying the other's sandboxes (any success is a leak)
  e2b        the unmodified e2b Python SDK over TCP: create, commands (foreground,
             background, stdin, kill), files (content checked; directories, several files
             at once, rename, remove, watch), terminals, fork, metrics, pause, connect,
             timeouts, listing, kill, while the CLI stops, starts, rolls back and removes the same
             sandboxes (needs the SDK: scripts/soak runs this file with its venv's python)
  processes  background processes, `ps`, `kill`, exec timeouts, stdin, large output,
             files and directories copied in and out (content checked), while the same
             sandboxes are stopped, started, paused, rolled back and removed

  mcp        the daemon's MCP endpoint over TCP (JSON-RPC `tools/call`): create, run
             commands (output checked), write and read files (content checked), list,
             snapshot, fork, rollback, diff, destroy, while the CLI stops, starts, pauses
             and removes the same sandboxes
  restart    (alongside others) every 8-20 s kills the daemon (SIGKILL, or SIGTERM one time
             in four; or, one time in five, SIGKILLs its spawner instead, which the daemon
             must replace) in the middle of the other workloads' requests and starts it again
             (SOAK_DAEMON_ARGV, SOAK_DAEMON_PID, SOAK_DAEMON_PIDFILE, SOAK_DAEMON_LOG from
             scripts/soak); then every sandbox it lists as running must run a command.
             Failures from the kill until 2 s after the daemon answers again are shown
             apart and are expected; content checks and the checks after a restart are not

Every failure is grouped by its message. A failure that concurrent requests explain (the
sandbox was removed, stopped or restarted meanwhile, a state conflict, something not
found) is expected; anything else (an internal error, a timeout, wrong content, a broken
exchange with an agent) is a finding, and makes the exit status 1.
"""
import collections
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

AGENTBOX, HOST, SECONDS = sys.argv[1], sys.argv[2], float(sys.argv[3])
WORKLOADS = sys.argv[4:] or ["lifecycle"]
INGRESS_PORT = int(os.environ.get("SOAK_INGRESS_PORT", "0"))
CLI = [AGENTBOX, "--host", HOST]

# Messages a concurrent request explains.
EXPECTED = re.compile(
    "|".join(
        [
            r"not found",
            r"is (stopped|paused|starting|stopping|being destroyed|running|exited)",
            r"was (removed|stopped|restarted|ended)[^;]* while the request ran",
            r"went away before the process exited",
            r"already exists",
            r"is being (created|mounted)",
            r"is used by sandbox",
            r"has a warm pool",
            r"takes no allow rules",
            r"try again when it is not",
            r"no processes to measure",
            r"nothing listens on port",  # a server started a moment ago
            r"no sandbox '",  # the ingress proxy: removed meanwhile
            r"did not answer the request",  # the ingress proxy: removed during the request
            r"write to '[0-9N.]+': Connection refused",  # no DNS proxy without an upstream (--dns-upstream none)
            r"^<exit status",  # the command's own status (a probe that cannot resolve, a killed sleep)
            r"sandbox uid ranges are in use",  # all workloads at once can take every slot
            r"command killed after its timeout",  # the workload's own `exec --timeout`
            r"Command exited with code -N and error:\s*$",  # e2b: killed by a stop, rollback or removal
            r"Error reading content: request or response body error",  # e2b: a download cut after its first bytes
            r"broke off: sandbox \S+ (was removed meanwhile|is \w+ now|was restarted meanwhile)",  # a download cut by a removal, stop or restart
            r"nonexistent directory|can't open|No such file or directory\Z|Directory not empty|no such file or directory: /tmp/(cp|eNb|eNbd|mcp)-",  # the workload's own races
            r"\(a rollback meanwhile\?\)$",  # a rollback of the same sandbox by another thread between two calls
            r"doesn't exist or you don't have access to it",  # e2b: a fork of a sandbox removed meanwhile
        ]
    )
)

lock = threading.Lock()
failures = collections.Counter()
examples = {}
expected_keys = set()
ops = collections.Counter()
boxes, snaps = [], []
# Sandboxes whose removal a workload saw succeed: none may be left at the end.
removed_ok = set()


# (killed at, answering again at) for each restart of the daemon by the restart workload.
restarts = []
restart_signals = []
RESTART_GRACE = 2.0
# Checks of content and of the state after a restart: findings whenever they fail.
ALWAYS_FINDINGS = re.compile(r"^(wrong |read \d+ bytes back|stdin came back|after a restart|the workload raised)")


def during_restart(t):
    with lock:
        return any(k <= t and (b is None or t <= b + RESTART_GRACE) for k, b in restarts)


def note(what, message, example):
    if during_restart(time.time()) and not ALWAYS_FINDINGS.search(message):
        what += " [during a daemon restart]"
    normal = re.sub(r"\d+", "N", re.sub(r"[0-9a-f]{8,}", "<id>", message))
    key = (what, normal[:160])
    # Judged on the whole message (the key is cut short).
    expected = not ALWAYS_FINDINGS.search(message) and (
        bool(EXPECTED.search(normal) or EXPECTED.search(message)) or what.endswith("[during a daemon restart]")
    )
    with lock:
        if expected:
            expected_keys.add(key)
        failures[key] += 1
        examples.setdefault(key, example[:300])


def cli(*args, timeout=120):
    sub = args[0] in ("net", "template", "pool", "volume") or (args[0] == "snapshot" and args[1] in ("rm", "ls"))
    name = " ".join(args[:2]) if sub else args[0]
    with lock:
        ops[name] += 1
    try:
        p = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        note(name, "TIMEOUT after %ds" % timeout, " ".join(args))
        return None
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        msg = lines[-1] if lines else "<exit status %d>" % p.returncode
        note(name, msg, " ".join(args) + " :: " + msg)
        return None
    return p.stdout


def pick(items):
    with lock:
        return random.choice(items) if items else None


# Removals that failed while the daemon was restarting, tried again once it is back.
evict_later = []


def keep(items, item, limit, evict=lambda old: cli("rm", "-f", old)):
    """Adds item to items; the oldest beyond limit goes (by default: a sandbox, removed)."""
    with lock:
        items.append(item)
        old = items.pop(0) if len(items) > limit else None
    if old and evict(old) is None and during_restart(time.time()):
        with lock:
            evict_later.append((evict, old))


def keep_snapshot(items, item, limit):
    keep(items, item, limit, lambda old: cli("snapshot", "rm", old))


def drop(items, item):
    with lock:
        if item in items:
            items.remove(item)


def lifecycle():
    r, b = random.random(), pick(boxes)
    if r < 0.12 or b is None:
        args = ["create", "-T", "mini"]
        if random.random() < 0.3:
            args += ["--net", "allow", "--allow", "x.test", "--allow", "198.51.100.0/24:80"]
        if random.random() < 0.2:
            args += ["--memory", random.choice(["64M", "256M"])]
        if random.random() < 0.1:
            args += ["--persist"]
        out = cli(*args)
        if out:
            keep(boxes, out.strip(), 25)
    elif r < 0.22:
        out = cli("exec", b, "--", "echo", "hi")
        if out is not None and out != "hi\n":
            note("exec", "wrong output %r" % out[:40], b)
    elif r < 0.30:
        cli("exec", b, "--", "sh", "-c", random.choice(["mkdir -p /tmp/w && for i in $(seq 200); do echo $i > /tmp/w/f$i; done", "rm -rf /tmp/w", "sleep 0.3"]))
    elif r < 0.38:
        out = cli("snapshot", b)
        if out:
            keep_snapshot(snaps, out.strip(), 40)
    elif r < 0.43:
        s = pick(snaps)
        out = s and cli("fork", s, "--count", str(random.choice([1, 2, 3])))
        for i in (out or "").split():
            keep(boxes, i, 25)
    elif r < 0.46:
        for i in (cli("fork", b) or "").split():
            keep(boxes, i, 25)
    elif r < 0.52:
        s = pick(snaps)
        if s:
            cli("rollback", b, s)
    elif r < 0.57:
        cli("pause", b)
    elif r < 0.62:
        cli("resume", b)
    elif r < 0.66:
        cli("stop", b, "--time", "1")
    elif r < 0.71:
        cli("start", b)
    elif r < 0.75:
        mode = random.choice(["none", "public", "allow"])
        cli("net", "set", b, "--net", mode, *([] if mode == "none" else ["--allow", "y.test"]))
    elif r < 0.78:
        cli("diff", b)
    elif r < 0.80:
        cli("cp", "/etc/hostname", b + ":/tmp/h")
    elif r < 0.82:
        cli("timeout", b, random.choice(["2s", "30m"]))
    elif r < 0.86:
        s = pick(snaps)
        if s and cli("snapshot", "rm", s) is not None:
            drop(snaps, s)
    elif r < 0.88:
        cli("pool", "set", "mini", "--min", str(random.choice([1, 2, 5])), "--max", "10")
    elif r < 0.90:
        cli("stats", b)
    elif cli("rm", "-f", b) is not None:
        drop(boxes, b)


net_boxes = []


def ingress(b):
    with lock:
        ops["ingress"] += 1
    try:
        c = http.client.HTTPConnection("127.0.0.1", INGRESS_PORT, timeout=10)
        c.request("GET", "/hostname", headers={"E2b-Sandbox-Id": b, "E2b-Sandbox-Port": "8000"})
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            note("ingress", body.decode(errors="replace"), b)
        elif body.strip() != b"sandbox":
            note("ingress", "wrong body %r" % body[:40], b)
    except (OSError, http.client.HTTPException) as e:
        note("ingress", "%s: %s (removed meanwhile?)" % (type(e).__name__, e), b)


def network():
    r, b = random.random(), pick(net_boxes)
    if r < 0.15 or b is None:
        mode = random.choice(["none", "public", "allow"])
        out = cli("create", "-T", "mini", "--net", mode, *(["--allow", "x.test"] if mode == "allow" else []))
        if out and cli("exec", "-d", out.strip(), "--", "httpd", "-f", "-p", "8000", "-h", "/etc") is not None:
            keep(net_boxes, out.strip(), 20)
    elif r < 0.45 and INGRESS_PORT:
        ingress(b)
    elif r < 0.55:
        cli("exec", b, "--", "nslookup", random.choice(["x.test", "y.test", "example.com"]))
    elif r < 0.65:
        cli("net", "set", b, "--net", random.choice(["public", "allow"]), "--allow", "x.test")
    elif r < 0.70:
        cli("net", "set", b, "--net", "none")
    elif r < 0.75:
        cli("net", "log", b)
    elif r < 0.80:
        cli("pause", b)
    elif r < 0.85:
        cli("net", "test", b)
    elif cli("rm", "-f", b) is not None:
        drop(net_boxes, b)


CONTEXT = tempfile.mkdtemp(prefix="abxsoak-ctx-")
with open(os.path.join(CONTEXT, "file.txt"), "w") as f:
    f.write("hello\n")
with open(os.path.join(CONTEXT, "Dockerfile"), "w") as f:
    f.write("FROM mini\nUSER root\nARG V=0\nRUN echo \"v$V\" > /version\nCOPY file.txt /etc/file.txt\nWORKDIR /work\nENV HELLO=world\n")
TEMPLATES = ["soak1", "soak2", "soak3"]
tmpl_boxes = []


def templates():
    r, t = random.random(), random.choice(TEMPLATES)
    if r < 0.15:
        cli("template", "build", "-f", os.path.join(CONTEXT, "Dockerfile"), "--build-arg", "V=%d" % random.randint(0, 3), CONTEXT, t)
    elif r < 0.40:
        args = ["create", "-T", t]
        if random.random() < 0.3:
            args += ["-v", random.choice(["soakv1", "soakv2"]) + ":/data"]
        out = cli(*args)
        if out:
            i = out.strip()
            o = cli("exec", i, "--", "sh", "-c", "cat /version /etc/file.txt; pwd; echo $HELLO")
            if o is not None and not re.match(r"^v\d\nhello\n/work\nworld\n$", o):
                note("content", "unexpected %r" % o[:60], i)
            keep(tmpl_boxes, i, 15)
    elif r < 0.48:
        cli("template", "rm", t)
    elif r < 0.55:
        cli("pool", "set", t, "--min", str(random.choice([1, 2])), "--max", "4")
    elif r < 0.60:
        cli("pool", "rm", t)
    elif r < 0.65:
        cli("volume", "create", random.choice(["soakv1", "soakv2"]))
    elif r < 0.70:
        cli("volume", "rm", random.choice(["soakv1", "soakv2"]))
    elif r < 0.74:
        cli("template", "tag", t, t + ":x")
    elif r < 0.78:
        cli("template", "ls")
    elif r < 0.80:
        cli("template", "prune")
    else:
        b = pick(tmpl_boxes)
        if b and cli("rm", "-f", b) is not None:
            drop(tmpl_boxes, b)


# Two tenants through the TCP listener, each with its own key: neither may ever see, or
# act on, the other's sandboxes and snapshots, whatever runs at the same time.
TCP = os.environ.get("SOAK_TCP", "")
tenant_keys = {}
tenant_made = {"soakA": set(), "soakB": set()}


def as_tenant(tenant, *args):
    env = dict(os.environ, AGENTBOX_API_KEY=tenant_keys[tenant])
    name = "%s (tenant)" % args[0]
    with lock:
        ops[name] += 1
    try:
        p = subprocess.run([AGENTBOX, "--host", TCP] + list(args), capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        note(name, "TIMEOUT", " ".join(args))
        return None, ""
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return None, lines[-1] if lines else "<exit status %d>" % p.returncode
    return p.stdout, ""


def tenants():
    me = random.choice(["soakA", "soakB"])
    other = "soakB" if me == "soakA" else "soakA"
    with lock:
        mine = list(tenant_made[me])
        theirs = list(tenant_made[other])
    r = random.random()
    if len(mine) > 12:
        r = 1.0  # a removal: each tenant keeps a dozen or so
    if r < 0.25 or not mine:
        out, err = as_tenant(me, "create", "-T", "mini")
        if out:
            with lock:
                tenant_made[me].add(out.strip())
        elif err:
            note("create (tenant)", err, me)
    elif r < 0.40:
        snap, err = as_tenant(me, "snapshot", random.choice(mine))
        if snap:
            out, err = as_tenant(me, "fork", snap.strip(), "--count", "2")
            with lock:
                tenant_made[me].update((out or "").split())
            as_tenant(me, "snapshot", "rm", snap.strip())
    elif r < 0.60:
        out, err = as_tenant(me, "ls", "-q")
        if out is not None:
            seen = set(out.split())
            with lock:
                leaked = seen & tenant_made[other]
            if leaked:
                note("ls (tenant)", "LEAK: %s lists %s's sandboxes" % (me, other), " ".join(sorted(leaked)))
        out, err = as_tenant(me, "snapshot", "ls", "-q")
    elif r < 0.75 and theirs:
        victim = random.choice(theirs)
        verb = random.choice([["exec", victim, "--", "echo", "pwned"], ["inspect", victim], ["rm", "-f", victim], ["snapshot", victim], ["fork", victim]])
        out, err = as_tenant(me, *verb)
        if out is not None:
            note("%s (tenant)" % verb[0], "LEAK: %s reached %s's sandbox" % (me, other), victim)
        elif "not found" not in err:
            note("%s (tenant)" % verb[0], "another tenant's sandbox answered: " + err, victim)
    else:
        victim = random.choice(mine)
        out, err = as_tenant(me, "rm", "-f", victim)
        # A removal that failed (the daemon away for a restart) is tried again later:
        # dropping the id would leave the sandbox to nobody.
        if out is not None or "not found" in err:
            with lock:
                tenant_made[me].discard(victim)
                if out is not None:
                    removed_ok.add(victim)


proc_boxes, proc_snaps = [], []


def cli_in(data, *args, timeout=120):
    """Like cli, with `data` on the command's stdin."""
    with lock:
        ops[args[0] + " -i"] += 1
    try:
        p = subprocess.run(CLI + list(args), input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        note(args[0] + " -i", "TIMEOUT after %ds" % timeout, " ".join(args))
        return None
    if p.returncode != 0:
        lines = p.stderr.decode(errors="replace").strip().splitlines()
        msg = lines[-1] if lines else "<exit status %d>" % p.returncode
        note(args[0] + " -i", msg, " ".join(args) + " :: " + msg)
        return None
    return p.stdout


def processes():
    r, b = random.random(), pick(proc_boxes)
    if r < 0.08 or b is None:
        out = cli("create", "-T", "mini")
        if out:
            keep(proc_boxes, out.strip(), 10)
    elif r < 0.20:
        out = cli("exec", "-d", b, "--", "sleep", random.choice(["1", "30"]))
        if out is not None and not re.match(r"^\d+$", out.strip()):
            note("exec -d", "not a pid: %r" % out[:40], b)
    elif r < 0.28:
        out = cli("ps", b)
        pids = re.findall(r"^\s*(\d+)\s", out or "", re.M)
        if pids:
            cli("kill", "-s", random.choice(["TERM", "KILL", "INT", "HUP"]), b, random.choice(pids))
    elif r < 0.33:
        # The command's own status (killed by the timeout) is expected; a hang is not.
        cli("exec", "--timeout", "1s", b, "--", "sleep", "5", timeout=30)
    elif r < 0.43:
        data = os.urandom(random.choice([10, 70000, 3000000]))
        out = cli_in(data, "exec", "-i", b, "--", "cat")
        if out is not None and out != data:
            note("exec -i", "stdin came back different (%d of %d bytes)" % (len(out), len(data)), b)
    elif r < 0.50:
        n = random.choice([1000, 5000000])
        out = cli("exec", b, "--", "sh", "-c", "head -c %d /dev/zero | tr '\\0' a" % n)
        if out is not None and out != "a" * n:
            note("exec", "output of %d bytes came back as %d" % (n, len(out)), b)
    elif r < 0.62:
        d = tempfile.mkdtemp(prefix="abxsoak-cp-")
        try:
            data = os.urandom(random.choice([100, 2000000]))
            with open(os.path.join(d, "in"), "wb") as f:
                f.write(data)
            path = "/tmp/cp-%d" % random.getrandbits(48)
            if cli("cp", os.path.join(d, "in"), b + ":" + path) is not None:
                if cli("cp", b + ":" + path, os.path.join(d, "out")) is not None:
                    with open(os.path.join(d, "out"), "rb") as f:
                        back = f.read()
                    # (A rollback in between to a snapshot taken during the upload would
                    # bring back part of the file: rare.)
                    if back != data:
                        note("cp", "copied back %d bytes, not the %d sent" % (len(back), len(data)), b)
        finally:
            subprocess.run(["rm", "-rf", d])
    elif r < 0.68:
        d = tempfile.mkdtemp(prefix="abxsoak-cp-")
        try:
            os.makedirs(os.path.join(d, "tree/a/b"))
            for i in range(50):
                with open(os.path.join(d, "tree/a/b/f%d" % i), "w") as f:
                    f.write("%d\n" % i)
            dest = "/tmp/t%d" % random.getrandbits(48)
            if cli("cp", os.path.join(d, "tree"), b + ":" + dest) is not None:
                # Gone after a rollback in between: exit status 3, expected.
                out = cli("exec", b, "--", "sh", "-c", "test -d %s/a/b || exit 3; cat %s/a/b/f* | wc -l" % (dest, dest))
                if out is not None and out.strip() != "50":
                    note("cp", "a copied tree has %r lines, not 50" % out.strip(), b)
        finally:
            subprocess.run(["rm", "-rf", d])
    elif r < 0.72:
        cli("stop", b, "--time", "1")
    elif r < 0.77:
        cli("start", b)
    elif r < 0.81:
        cli("pause", b)
    elif r < 0.85:
        out = cli("snapshot", b)
        if out:
            keep_snapshot(proc_snaps, out.strip(), 10)
    elif r < 0.89:
        s = pick(proc_snaps)
        if s:
            cli("rollback", b, s)
    elif r < 0.93:
        cli("stats", b)
    elif cli("rm", "-f", b) is not None:
        drop(proc_boxes, b)


e2b_boxes, e2b_snaps = [], []
E2B = None


def e2b_call(what, fn):
    """Runs fn (an SDK call); an exception is noted as a failure of `what`."""
    with lock:
        ops["e2b " + what] += 1
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        note("e2b " + what, msg, msg)
        return None


def e2b_files_ops(sb, b):
    """make_dir, write_files, exists, get_info, watch_dir, rename and remove on a tree of
    its own; content and names checked (a rollback or restart in between explains a
    not-found)."""
    d = "/tmp/e2bd-%d" % random.getrandbits(48)
    if not e2b_call("files.make_dir", lambda: sb.files.make_dir(d)):
        return
    w = e2b_call("files.watch_dir", lambda: sb.files.watch_dir(d))
    files = [{"path": "%s/f%d" % (d, i), "data": "n%d" % i} for i in range(3)]
    if e2b_call("files.write_files", lambda: sb.files.write_files(files)) is None:
        return
    if e2b_call("files.exists", lambda: sb.files.exists(d + "/f1")) is False:
        note("e2b files.exists", "a file just written does not exist (a rollback meanwhile?)", b)
    info = e2b_call("files.get_info", lambda: sb.files.get_info(d + "/f2"))
    if info is not None and (info.size, info.name) != (2, "f2"):
        note("e2b files.get_info", "wrong info %r" % ((info.size, info.name),), b)
    if e2b_call("files.rename", lambda: sb.files.rename(d + "/f0", d + "/g0")) is not None:
        back = e2b_call("files.read", lambda: sb.files.read(d + "/g0"))
        if back is not None and back != "n0":
            note("e2b files.read", "a renamed file reads %r" % back[:20], b)
    if w is not None:
        events = e2b_call("watch.get_new_events", lambda: w.get_new_events())
        e2b_call("watch.stop", lambda: w.stop())
        if events is not None and not events:
            # (A pause, stop or rollback meanwhile ends the watch with nothing: rare.)
            note("e2b watch_dir", "no events for three writes and a rename", b)
    e2b_call("files.remove", lambda: sb.files.remove(d))
    if e2b_call("files.exists", lambda: sb.files.exists(d)):
        note("e2b files.remove", "a removed directory still exists (a rollback meanwhile?)", b)


def e2b_pty(sb, b):
    """A terminal: create, input, resize, output checked, kill."""
    from e2b.sandbox.commands.command_handle import PtySize

    out = []
    h = e2b_call("pty.create", lambda: sb.pty.create(PtySize(rows=24, cols=80), timeout=20))
    if h is None:
        return
    e2b_call("pty.resize", lambda: sb.pty.resize(h.pid, PtySize(rows=30, cols=100)))
    e2b_call("pty.send_stdin", lambda: sb.pty.send_stdin(h.pid, b"echo pty-$((6*7))\nexit\n"))
    res = e2b_call("pty.wait", lambda: h.wait(on_pty=lambda data: out.append(bytes(data))))
    if res is not None and b"pty-42" not in b"".join(out):
        note("e2b pty", "the terminal's output lacks pty-42: %r" % b"".join(out)[-60:], b)


def e2b():
    r, b = random.random(), pick(e2b_boxes)
    if r < 0.08 or b is None:
        sb = e2b_call("create", lambda: E2B.Sandbox.create("mini", timeout=random.choice([5, 300])))
        if sb:
            keep(e2b_boxes, sb.sandbox_id, 10, lambda old: e2b_call("kill", lambda: E2B.Sandbox.kill(old)))
        return
    sb = e2b_call("connect", lambda: E2B.Sandbox.connect(b, timeout=300))
    if sb is None:
        return
    if r < 0.25:
        res = e2b_call("commands.run", lambda: sb.commands.run("echo hi; echo ho >&2"))
        if res is not None and (res.stdout, res.stderr) != ("hi\n", "ho\n"):
            note("e2b commands.run", "wrong output %r %r" % (res.stdout[:30], res.stderr[:30]), b)
    elif r < 0.33:
        h = e2b_call("commands.run bg", lambda: sb.commands.run("sleep 30", background=True))
        if h is not None:
            e2b_call("commands.list", lambda: sb.commands.list())
            e2b_call("commands.kill", lambda: h.kill())
    elif r < 0.40:
        h = e2b_call("commands.run stdin", lambda: sb.commands.run("cat", background=True, stdin=True))
        if h is not None:
            data = "x" * random.choice([10, 50000])
            e2b_call("commands.send_stdin", lambda: sb.commands.send_stdin(h.pid, data))
            e2b_call("commands.close_stdin", lambda: sb.commands.close_stdin(h.pid))
            res = e2b_call("commands.wait", lambda: h.wait())
            if res is not None and res.stdout != data:
                note("e2b commands.wait", "stdin came back as %d of %d bytes" % (len(res.stdout), len(data)), b)
    elif r < 0.55:
        data = os.urandom(random.choice([100, 1 << 20]))
        path = "/tmp/e2b-%d" % random.getrandbits(48)
        if e2b_call("files.write", lambda: sb.files.write(path, data)) is not None:
            back = e2b_call("files.read", lambda: sb.files.read(path, format="bytes"))
            if back is not None and bytes(back) != data:
                note("e2b files.read", "read %d bytes back, not the %d written" % (len(back), len(data)), b)
    elif r < 0.58:
        e2b_call("files.list", lambda: sb.files.list("/tmp"))
    elif r < 0.61:
        e2b_files_ops(sb, b)
    elif r < 0.63:
        e2b_pty(sb, b)
    elif r < 0.64:
        for f in e2b_call("fork", lambda: sb.fork(count=random.choice([1, 2]))) or []:
            if isinstance(f, Exception):
                note("e2b fork", "%s: %s" % (type(f).__name__, str(f).strip().splitlines()[-1] if str(f).strip() else ""), b)
            else:
                keep(e2b_boxes, f.sandbox_id, 10, lambda old: e2b_call("kill", lambda: E2B.Sandbox.kill(old)))
    elif r < 0.65:
        e2b_call("get_metrics", lambda: sb.get_metrics())
        e2b_call("is_running", lambda: sb.is_running())
    elif r < 0.66:
        e2b_call("pause", lambda: sb.pause())
    elif r < 0.70:
        e2b_call("set_timeout", lambda: sb.set_timeout(random.choice([3, 300])))
    elif r < 0.74:
        e2b_call("get_info", lambda: sb.get_info())
    elif r < 0.77:
        e2b_call("list", lambda: E2B.Sandbox.list().next_items())
    elif r < 0.81:
        out = cli("snapshot", b)
        if out:
            keep_snapshot(e2b_snaps, out.strip(), 10)
    elif r < 0.85:
        s = pick(e2b_snaps)
        if s:
            cli("rollback", b, s)
    elif r < 0.89:
        cli("stop", b, "--time", "1")
    elif r < 0.92:
        cli("start", b)
    elif r < 0.96:
        # Kept when the kill failed (the daemon away for a restart): tried again later.
        if e2b_call("kill", lambda: sb.kill()) is not None:
            drop(e2b_boxes, b)
    else:
        if cli("rm", "-f", b) is not None:
            drop(e2b_boxes, b)


mcp_boxes, mcp_snaps = [], []
mcp_key = None


def mcp_call(tool, **args):
    """Calls an MCP tool through the daemon's /mcp endpoint; returns the structured
    result, or None after noting the failure (a tool error or a broken exchange)."""
    name = "mcp " + tool
    with lock:
        ops[name] += 1
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}})
    u = urllib.parse.urlsplit(TCP)
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        c.request("POST", "/mcp", body, {"Authorization": "Bearer " + mcp_key, "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
        r = c.getresponse()
        raw = r.read()
        c.close()
    except (OSError, http.client.HTTPException) as e:
        note(name, "%s: %s" % (type(e).__name__, e), tool)
        return None
    if r.status != 200:
        note(name, "HTTP %d: %s" % (r.status, raw[:200].decode(errors="replace")), tool)
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        note(name, "not JSON: %r" % raw[:80], tool)
        return None
    if "error" in msg:
        note(name, "JSON-RPC error: %s" % msg["error"].get("message", msg["error"]), tool)
        return None
    res = msg.get("result", {})
    if res.get("isError"):
        text = " ".join(c.get("text", "") for c in res.get("content", []))
        msg = text.strip().splitlines()[-1] if text.strip() else "<tool error>"
        note(name, msg, msg[-150:] + " :: " + tool + " " + json.dumps(args)[:120])
        return None
    return res.get("structuredContent", {})


def mcp():
    r, b = random.random(), pick(mcp_boxes)
    if r < 0.10 or b is None:
        out = mcp_call("create_sandbox", template="mini", timeout_secs=random.choice([0, 600]))
        if out:
            keep(mcp_boxes, out["id"], 10, lambda old: mcp_call("destroy_sandbox", sandbox=old))
    elif r < 0.30:
        word = "w%d" % random.getrandbits(32)
        out = mcp_call("run_command", sandbox=b, command="echo %s; echo err >&2" % word)
        # (Killed by a stop, rollback or removal: the result says so with its signal.)
        if out is not None and out.get("signal") is None and (out.get("stdout"), out.get("stderr"), out.get("exit_code")) != (word + "\n", "err\n", 0):
            note("mcp run_command", "wrong result %r" % json.dumps(out)[:80], b)
    elif r < 0.35:
        out = mcp_call("run_command", sandbox=b, argv=["cat"], stdin="x" * 70000)
        if out is not None and out.get("signal") is None and out.get("stdout") != "x" * 70000:
            note("mcp run_command", "stdin came back as %d bytes" % len(out.get("stdout") or ""), b + " " + json.dumps(out)[-100:])
    elif r < 0.50:
        text = "t%d\n" % random.getrandbits(64) * random.choice([1, 20000])
        path = "/tmp/mcp-%d/f" % random.getrandbits(32)
        if mcp_call("write_file", sandbox=b, path=path, content=text) is not None:
            out = mcp_call("read_file", sandbox=b, path=path)
            # (A rollback or a stop and start in between takes the file away: not found.)
            if out is not None and out.get("content") != text:
                note("mcp read_file", "read %d bytes back, not the %d written" % (out.get("bytes", -1), len(text)), b)
    elif r < 0.55:
        mcp_call("list_files", sandbox=b, path="/tmp", depth=2)
    elif r < 0.62:
        out = mcp_call("snapshot", sandbox=b)
        if out:
            keep_snapshot(mcp_snaps, out["id"], 10)
    elif r < 0.66:
        s = pick(mcp_snaps)
        out = s and mcp_call("fork", snapshot=s, count=random.choice([1, 2]))
        for sb in (out or {}).get("sandboxes", []):
            keep(mcp_boxes, sb["id"], 10, lambda old: mcp_call("destroy_sandbox", sandbox=old))
    elif r < 0.70:
        s = pick(mcp_snaps)
        if s:
            mcp_call("rollback", sandbox=b, snapshot=s)
    elif r < 0.74:
        mcp_call("diff", sandbox=b)
    elif r < 0.77:
        mcp_call("list_sandboxes")
    elif r < 0.80:
        mcp_call("list_snapshots", sandbox=b)
    elif r < 0.84:
        cli("stop", b, "--time", "1")
    elif r < 0.88:
        cli("start", b)
    elif r < 0.92:
        cli("pause", b)
    elif r < 0.96:
        if cli("rm", "-f", b) is not None:
            drop(mcp_boxes, b)
    elif mcp_call("destroy_sandbox", sandbox=b) is not None:
        drop(mcp_boxes, b)


DAEMON_ARGV = json.loads(os.environ.get("SOAK_DAEMON_ARGV", "null"))
daemon_pid = int(os.environ.get("SOAK_DAEMON_PID", "0"))


def gone(pid):
    """Whether process pid has exited (a zombie counts: its parent reaps it later)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # gone before the open (ENOENT) or between it and the read (ESRCH)
        return True


def restart():
    """Kills the daemon, starts it again, and checks that what it lists as running runs."""
    global daemon_pid
    time.sleep(random.uniform(8, 20))
    if time.time() > deadline - 5:
        return
    if random.random() < 0.2:
        return kill_spawner()
    sig = random.choice([9, 9, 9, 15])
    with lock:
        restarts.append((time.time(), None))
        restart_signals.append("SIGKILL" if sig == 9 else "SIGTERM")
        ops["daemon %s" % ("SIGKILL" if sig == 9 else "SIGTERM")] += 1
    os.kill(daemon_pid, sig)
    t0 = time.time()
    while not gone(daemon_pid):
        if time.time() - t0 > 60:
            note("restart", "the daemon did not exit within 60 s of signal %d" % sig, str(daemon_pid))
            os.kill(daemon_pid, 9)
            t0 = time.time()
        time.sleep(0.05)
    with open(os.environ["SOAK_DAEMON_LOG"], "ab") as log:
        proc = subprocess.Popen(DAEMON_ARGV, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    daemon_pid = proc.pid
    with open(os.environ["SOAK_DAEMON_PIDFILE"], "w") as f:
        f.write("%d\n" % proc.pid)
    threading.Thread(target=proc.wait, daemon=True).start()
    t0 = time.time()
    while subprocess.run(CLI + ["ls", "-q"], capture_output=True).returncode != 0:
        if proc.poll() is not None or time.time() - t0 > 60:
            note("restart", "after a restart the daemon did not answer (exit status %r)" % proc.poll(), " ".join(DAEMON_ARGV))
            raise SystemExit
        time.sleep(0.05)
    with lock:
        restarts[-1] = (restarts[-1][0], time.time())
        ops["daemon back"] += 1
        later = evict_later[:]
        evict_later.clear()
    for evict, old in later:
        evict(old)
    check_running()


def kill_spawner():
    """SIGKILLs the daemon's spawner (the process that makes sandboxes): the daemon must
    start another, and the sandboxes must not notice."""
    out = subprocess.run(CLI + ["system"], capture_output=True, text=True).stdout
    old = json.loads(out or "{}").get("spawner_pid")
    if not old:
        return
    with lock:
        restarts.append((time.time(), None))
        restart_signals.append("spawner")
        ops["spawner SIGKILL"] += 1
    os.kill(old, 9)
    t0 = time.time()
    while True:
        out = subprocess.run(CLI + ["system"], capture_output=True, text=True).stdout
        new = json.loads(out or "{}").get("spawner_pid")
        if new and new != old:
            break
        if time.time() - t0 > 30:
            note("restart", "after a restart: no new spawner 30 s after the old one was killed", str(old))
            break
        time.sleep(0.05)
    with lock:
        restarts[-1] = (restarts[-1][0], time.time())
    check_running()


def check_running():
    # Every sandbox listed as running runs a command, unless another workload stopped,
    # paused or removed it meanwhile.
    out = subprocess.run(CLI + ["ls", "--json"], capture_output=True, text=True).stdout
    for sb in json.loads(out or "[]"):
        if sb.get("state") != "running":
            continue
        p = subprocess.run(CLI + ["exec", sb["id"], "--", "true"], capture_output=True, text=True, timeout=60)
        with lock:
            ops["exec after a restart"] += 1
        msg = (p.stderr.strip().splitlines() or ["<exit status %d>" % p.returncode])[-1]
        if p.returncode != 0 and not EXPECTED.search(msg):
            note("restart", "after a restart: " + msg, sb["id"])


WORK = {"lifecycle": lifecycle, "network": network, "templates": templates, "tenants": tenants, "processes": processes, "e2b": e2b, "mcp": mcp}
if "tenants" in WORKLOADS:
    if not TCP:
        sys.exit("the tenants workload needs SOAK_TCP (a TCP listener of the daemon)")
    for t in ("soakA", "soakB"):
        out = cli("key", "create", "--tenant", t)
        if not out:
            sys.exit("cannot make a key for tenant %s" % t)
        tenant_keys[t] = out.strip().split()[-1]
if "mcp" in WORKLOADS:
    if not TCP:
        sys.exit("the mcp workload needs SOAK_TCP (a TCP listener of the daemon)")
    out = cli("key", "create")
    if not out:
        sys.exit("cannot make an API key for the MCP endpoint")
    mcp_key = out.strip().splitlines()[0].split()[-1]
if "e2b" in WORKLOADS:
    if not TCP:
        sys.exit("the e2b workload needs SOAK_TCP (a TCP listener of the daemon)")
    out = cli("key", "create")
    if not out:
        sys.exit("cannot make an API key for the e2b SDK")
    key = out.strip().splitlines()[0].split()[-1]
    os.environ.update(E2B_API_URL=TCP, E2B_SANDBOX_URL=TCP, E2B_API_KEY=key, E2B_DOMAIN="agentbox.invalid")
    import e2b as E2B  # noqa: E402  (the venv's SDK; only this workload needs it)
deadline = time.time() + SECONDS


CLIENTS = [w for w in WORKLOADS if w != "restart"]
if not CLIENTS:
    sys.exit("the restart workload runs alongside others")
if "restart" in WORKLOADS and not (DAEMON_ARGV and daemon_pid):
    sys.exit("the restart workload needs SOAK_DAEMON_ARGV and SOAK_DAEMON_PID (scripts/soak sets them)")


def worker(n):
    work = WORK[CLIENTS[n % len(CLIENTS)]] if n >= 0 else restart
    while time.time() < deadline:
        try:
            work()
        except Exception as e:  # a bug of this file, or a restart that went wrong: a finding
            note(work.__name__, "the workload raised %s: %s" % (type(e).__name__, e), repr(e))
            if work is restart:
                return


threads = [threading.Thread(target=worker, args=(n,)) for n in range(max(6, len(CLIENTS)))]
if "restart" in WORKLOADS:
    threads.append(threading.Thread(target=worker, args=(-1,)))
for t in threads:
    t.start()
for t in threads:
    t.join()

shutil.rmtree(CONTEXT, ignore_errors=True)
print("operations: " + ", ".join("%s %d" % kv for kv in sorted(ops.items())))
findings = 0
for (what, msg), n in failures.most_common():
    expected = (what, msg) in expected_keys
    findings += 0 if expected else n
    print("%s %6d  %s: %s" % ("  " if expected else "!!", n, what, msg))
    if not expected:
        print("           e.g. %s" % examples[(what, msg)])
if restarts:
    down = sorted(b - k for k, b in restarts if b is not None)
    if down:
        print("daemon restarts: %d, down for %.2f s median, %.2f s at most (signal to answering `ls`): %s" % (
            len(down), down[len(down) // 2], down[-1], ", ".join("%s %.2f" % (restart_signals[i], b - k) for i, (k, b) in enumerate(restarts) if b is not None)))
# What is left: sandboxes a workload keeps (its own bookkeeping) and sandboxes none
# knows of (lost answers: a fork or an e2b create cut by a restart; or a leak).
try:
    left = json.loads(subprocess.run(CLI + ["ls", "--json"], capture_output=True, text=True, timeout=60).stdout or "[]")
except Exception as e:  # the daemon gone at the end: scripts/soak's cleanup says so
    left = []
with lock:
    known = set(boxes + net_boxes + tmpl_boxes + proc_boxes + e2b_boxes + mcp_boxes) | tenant_made["soakA"] | tenant_made["soakB"]
unknown = [sb for sb in left if sb["id"] not in known]
by = collections.Counter("%s/%s%s" % (sb.get("template"), sb.get("state"), "/" + sb["tenant"] if sb.get("tenant") else "") for sb in unknown)
near = sum(1 for sb in unknown if any(k - 5 <= sb.get("created_at", 0) <= (b or k) + RESTART_GRACE for k, b in restarts))
print("sandboxes left: %d, of them %d kept by a workload, %d by none%s%s" % (
    len(left), len(left) - len(unknown), len(unknown), (" (%s)" % ", ".join("%s %d" % kv for kv in by.most_common())) if unknown else "",
    ("; %d of these made within 5 s before a daemon restart" % near) if restarts and unknown else ""))
back = [sb["id"] for sb in unknown if sb["id"] in removed_ok]
if back:
    note("rm", "removed sandboxes are still there at the end: %d" % len(back), " ".join(back[:10]))
    findings += 1
for sb in unknown[:10]:
    print("    e.g. %s %s %s made %s" % (sb["id"], sb.get("tenant") or "-", sb.get("state"), time.strftime("%H:%M:%S", time.gmtime(sb.get("created_at", 0)))))
if unknown:
    print("    restarts at " + ", ".join(time.strftime("%H:%M:%S", time.gmtime(k)) for k, _ in restarts))
print("findings: %d (lines marked !!)" % findings)
sys.exit(1 if findings else 0)
