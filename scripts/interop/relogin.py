#!/usr/bin/env python3
"""Re-login checks: slixmpp clients moved by a crash of Prosody node 1.

Each user is a slixmpp application that connects again when it is
disconnected (slixmpp itself never does). All are relayed to node 1
(active/standby), which is SIGKILLed. Each client must receive a stream
error carrying a `<relogin xmlns='urn:x-prg-proxy:relogin:0'/>` hint, come
back at once by its own logic, be held by the proxy's pacer until its slot
(no client is let in before eviction time + `after`), and be authenticated
by Prosody node 2. Prints when each got back, and `PASS name` / `FAIL name:
why` lines.
"""

import argparse
import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402
import slixmpp  # noqa: E402

NS_RELOGIN = "urn:x-prg-proxy:relogin:0"
# `after` is given to the millisecond; allow the clocks' granularity.
SLACK = 0.05


class Returning(slixmpp.ClientXMPP):
    """A slixmpp application that reconnects when it is disconnected."""

    def __init__(self, opts, user):
        super().__init__("%s@%s/desk" % (user, opts.domain), clients.PASSWORD, sasl_mech="PLAIN")
        self.opts = opts
        self.user = user
        self.auto_reconnect = False
        self.ssl_context = clients.client_tls_context()
        self.sessions = []  # times of session_start
        self.hint = None  # (after, min, max, reason)
        self.condition = None
        self.evicted_at = None
        self.connects = 0
        self.first = asyncio.Event()
        self.back = asyncio.Event()
        self.add_event_handler("session_start", self._on_session)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)

    def go(self):
        self.connects += 1
        self.connect(
            (self.opts.host, self.opts.port),
            use_ssl=False,
            force_starttls=True,
            disable_starttls=False,
        )

    def _on_session(self, _event):
        self.sessions.append(time.time())
        (self.back if len(self.sessions) > 1 else self.first).set()

    def _on_stream_error(self, err):
        if self.evicted_at is not None:
            return
        self.evicted_at = time.time()
        self.condition = err["condition"]
        for child in err.xml:
            if child.tag == "{%s}relogin" % NS_RELOGIN:
                self.hint = tuple(
                    float(child.get(k, "nan")) for k in ("after", "min", "max")
                ) + (child.get("reason"),)

    def _on_disconnected(self, _reason):
        # The application's own logic: connect again, at once (a bounded
        # number of times), whatever the server said.
        if self.first.is_set() and not self.back.is_set() and self.connects < 20:
            asyncio.get_event_loop().call_later(0.2, self.go)


def authenticated(log, user):
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read().count("Authenticated as %s@example.com" % user)


async def run(opts):
    results = []

    def report(name, ok, why=""):
        results.append(ok)
        print(("PASS %s" % name) if ok else ("FAIL %s: %s" % (name, why)), flush=True)

    cs = [Returning(opts, u) for u in opts.users]
    for c in cs:
        c.go()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.first.wait() for c in cs)), opts.timeout)
    except asyncio.TimeoutError:
        report("relogin-setup", False, "not every client logged in through the proxy")
        return 1
    on2_before = {c.user: authenticated(opts.node2_log, c.user) for c in cs}

    pid = int(open(opts.node1_pidfile).read().strip())
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    # The window ends at 8 s: everyone is back well within the timeout.
    try:
        await asyncio.wait_for(asyncio.gather(*(c.back.wait() for c in cs)), opts.timeout + 10)
    except asyncio.TimeoutError:
        pass

    for c in sorted(cs, key=lambda c: c.sessions[-1] if len(c.sessions) > 1 else 1e18):
        back = "%.3f s" % (c.sessions[1] - t0) if len(c.sessions) > 1 else "never"
        hint = c.hint and "after=%.3f min=%.1f max=%.1f reason=%s" % c.hint
        print(
            "interop: %s evicted with <%s/> %s; connects %d; back at %s"
            % (c.user, c.condition, hint or "(no hint)", c.connects, back),
            flush=True,
        )

    hinted = [c for c in cs if c.hint is not None]
    report(
        "relogin-every-stream-carried-a-hint",
        len(hinted) == len(cs),
        "%d of %d had no <relogin/>" % (len(cs) - len(hinted), len(cs)),
    )
    inside = [c for c in hinted if c.hint[1] - 0.001 <= c.hint[0] <= c.hint[2] + 0.001 and c.hint[2] <= 8.001]
    report(
        "relogin-hints-inside-prosody2-window",
        len(inside) == len(hinted),
        "hints outside [min, max] or beyond 8 s: %s" % [c.hint for c in hinted if c not in inside],
    )
    returned = [c for c in cs if len(c.sessions) > 1]
    report(
        "relogin-every-client-back",
        len(returned) == len(cs),
        "%d of %d never got back" % (len(cs) - len(returned), len(cs)),
    )
    early = [
        c.user
        for c in returned
        if c.hint is not None and c.sessions[1] + SLACK < c.evicted_at + c.hint[0]
    ]
    report("relogin-nobody-in-before-its-slot", not early, "in before their slot: %s" % early)
    retried = [c for c in returned if c.connects > 1]
    report(
        "relogin-clients-came-back-by-themselves-and-were-held",
        len(retried) == len(returned),
        "some returned without reconnecting",
    )
    moved = [c.user for c in cs if authenticated(opts.node2_log, c.user) <= on2_before[c.user]]
    report("relogin-served-by-prosody2", not moved, "prosody2 did not authenticate %s" % moved)
    for c in cs:
        c.abort()
    return 0 if all(results) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", default="example.com")
    p.add_argument("--ca")
    p.add_argument("--users", nargs="+", required=True)
    p.add_argument("--node1-pidfile", required=True)
    p.add_argument("--node2-log", required=True)
    p.add_argument("--timeout", type=float, default=20)
    opts = p.parse_args()
    clients.CA_FILE = opts.ca
    sys.exit(asyncio.run(run(opts)))


if __name__ == "__main__":
    main()
