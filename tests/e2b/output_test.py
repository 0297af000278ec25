"""Large command output through the unmodified e2b Python SDK: every byte arrives, in
order, with the exit code, whether the process already finished its output or is still
writing it, and a client that leaves mid-stream does not stop the process.

Run by tests/integration/e2b.rs like sdk_test.py (same variables, template `mini`).
"""

import time

from sdk_test import check, new

# 2,000,000 lines of `seq`: 14,888,897 bytes, far above the agent's 1 MiB output buffer.
LINES = 2_000_000
EXPECTED = "".join(f"{i}\n" for i in range(1, LINES + 1))


def main():
    sb = new()
    try:
        sb.commands.run(f"seq 1 {LINES} > /tmp/seq")
        r = sb.commands.run("cat /tmp/seq")
        check(r.exit_code == 0, f"cat of a 15 MB file: exit code {r.exit_code}")
        check(len(r.stdout) == len(EXPECTED), f"cat of a 15 MB file: {len(r.stdout)} of {len(EXPECTED)} bytes")
        check(r.stdout == EXPECTED, "cat of a 15 MB file: every byte in order")

        chunks = []
        r = sb.commands.run(f"seq 1 {LINES}; echo tail >&2", on_stdout=chunks.append)
        check(r.stdout == EXPECTED and r.stderr == "tail\n", f"seq streamed: {len(r.stdout)} bytes, stderr {r.stderr!r}")
        check("".join(chunks) == EXPECTED, "seq streamed: on_stdout saw every byte")

        h = sb.commands.run(f"seq 1 {LINES}", background=True)
        time.sleep(0.5)  # the process waits for the unread stream meanwhile
        check(h.wait().stdout == EXPECTED, "background=True then wait(): every byte")

        h = sb.commands.run(f"seq 1 {LINES}; echo done > /tmp/done", background=True)
        h.disconnect()
        deadline = time.time() + 30
        while time.time() < deadline and sb.commands.run("cat /tmp/done 2>/dev/null || true").stdout != "done\n":
            time.sleep(0.2)
        if sb.commands.run("cat /tmp/done 2>&1 || true").stdout != "done\n":
            # What the process is doing, for the failure below.
            print("processes:", [(p.pid, p.args) for p in sb.commands.list()], flush=True)
            print(sb.commands.run("ps -o pid,stat,args", user="root").stdout, flush=True)
        check(sb.commands.run("cat /tmp/done").stdout == "done\n", "a process whose client left mid-output runs to its end")
    finally:
        sb.kill()


if __name__ == "__main__":
    main()
    print("ALL PASSED", flush=True)
