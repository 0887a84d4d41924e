#!/usr/bin/env python3
"""Failover checks against real Prosody nodes behind prg-proxy.

Node 1 is stopped with a signal (KILL: a crash; STOP: a silent hang) while a
user is relayed to it. The proxy must reach the source's row for a node lost
from the network (node 2 = Running in Backup Mode, reason Peer Down), close
the user's stream, and route a fresh login of that user to node 2. Prints
`PASS name` / `FAIL name: why` lines and the measured detection time.
"""

import argparse
import asyncio
import datetime
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402

TRANSITION = re.compile(
    r"^(\S+).*group state transition.*node2\.state=Running in Backup Mode\s+node2\.reason=Peer Down",
    re.M,
)


def log_matches(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return TRANSITION.findall(f.read())


def parse_ts(ts):
    # tracing's default timestamps: 2026-11-25T12:20:01.123456Z
    ts = ts.rstrip("Z")
    if "." in ts:
        head, frac = ts.split(".", 1)
        ts = head + "." + frac[:6]
    return datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()


def authenticated_on(log, user):
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read().count("Authenticated as %s@example.com" % user)


async def run(opts):
    results = []

    def report(name, ok, why=""):
        results.append(ok)
        print(("PASS %s" % name) if ok else ("FAIL %s: %s" % (name, why)), flush=True)

    kind = opts.signal.lower()
    sig = signal.SIGKILL if opts.signal == "KILL" else signal.SIGSTOP
    # A user relayed to node 1 (active/standby: everyone's home is node 1).
    alice = clients.RawStream(opts)
    try:
        await asyncio.wait_for(alice.login("alice"), opts.timeout)
    except Exception as e:  # noqa: BLE001
        report("%s-setup-login" % kind, False, repr(e))
        return 1
    before = len(log_matches(opts.proxy_log))
    on2_before = authenticated_on(opts.node2_log, "alice")
    pid = int(open(opts.node1_pidfile).read().strip())
    t0 = time.time()
    os.kill(pid, sig)

    # The transition, from the proxy's log.
    found = None
    deadline = time.monotonic() + opts.timeout
    while time.monotonic() < deadline:
        m = log_matches(opts.proxy_log)
        if len(m) > before:
            found = m[before]
            break
        await asyncio.sleep(0.02)
    if found is None:
        report("%s-node1-peer-down-row" % kind, False, "no transition to node 2 Running in Backup Mode / Peer Down")
    else:
        detected = parse_ts(found) - t0
        print("interop: SIG%s of prosody1 detected in %.3f s" % (opts.signal, detected), flush=True)
        report("%s-node1-peer-down-row" % kind, True)

    # A crash (connections reset, connect refused) is seen by the fast path,
    # not at the heartbeat timeout; a hang only by the heartbeats.
    if sig == signal.SIGKILL:
        with open(opts.proxy_log, encoding="utf-8", errors="replace") as f:
            fast = "a fresh connect is refused: node down" in f.read()
        report("kill-detected-by-the-fast-path", fast, "moved only at the heartbeat timeout")

    # The relayed user was told and disconnected.
    try:
        got = await asyncio.wait_for(alice.read_all(), opts.timeout)
        ok = b"<stream:error>" in got
        report("%s-relayed-user-told" % kind, ok, "no stream error, got %r" % got[-300:])
    except asyncio.TimeoutError:
        report("%s-relayed-user-told" % kind, False, "stream still open")
    alice.close()

    # A fresh login of a node-1 user is served by node 2.
    again = clients.RawStream(opts)
    try:
        await asyncio.wait_for(again.login("alice"), opts.timeout)
        on2 = authenticated_on(opts.node2_log, "alice")
        report("%s-new-login-served-by-node2" % kind, on2 > on2_before, "prosody2 did not authenticate alice")
    except Exception as e:  # noqa: BLE001
        report("%s-new-login-served-by-node2" % kind, False, repr(e))
    again.close()

    if sig == signal.SIGSTOP:
        os.kill(pid, signal.SIGCONT)
    return 0 if all(results) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--direct-tls-port", type=int, default=0)
    p.add_argument("--domain", default="example.com")
    p.add_argument("--ca")
    p.add_argument("--signal", choices=["KILL", "STOP"], required=True)
    p.add_argument("--node1-pidfile", required=True)
    p.add_argument("--node2-log", required=True)
    p.add_argument("--proxy-log", required=True)
    p.add_argument("--timeout", type=float, default=20)
    opts = p.parse_args()
    opts.no_tls = False
    clients.CA_FILE = opts.ca
    sys.exit(asyncio.run(run(opts)))


if __name__ == "__main__":
    main()
