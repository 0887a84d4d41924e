#!/usr/bin/env python3
"""Node faults while clients chat, against real Prosody nodes behind prg-proxy.

Four users of node 1 and four of node 2 (assignment file) chat in pairs,
a message every 50 ms each, so that stanzas are in flight both ways when
Prosody node 1 is stopped with a signal:

- KILL (a crash): node 1's clients must get a stream error carrying a
  re-login hint; node 2's clients must keep chatting without an error and
  without losing a message; a fresh login of a node-1 user must land on
  node 2 (the admin API's `GET /users/JID`).
- STOP, then CONT (a silent hang, then the node comes back): the same, with
  the hang detected within the heartbeat timeout; after SIGCONT the admin
  API must show node 1 healthy again (no heartbeat error) and the group
  falling back by itself (`auto_fallback`) to Normal / Normal, the user
  moved to node 2 told so with a `fallback` hint, and a fresh login served
  by node 1 again.

Prints `PASS name` / `FAIL name: why` lines and the measured times.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402
import failover  # noqa: E402
import slixmpp  # noqa: E402

NS_RELOGIN = "urn:x-prg-proxy:relogin:0"
EVERY = 0.05


class Chatter(slixmpp.ClientXMPP):
    """A client sending numbered messages to its partner and recording what
    arrives from it, and how its stream ended (if it did)."""

    def __init__(self, opts, user, partner):
        super().__init__("%s@%s/chat" % (user, opts.domain), clients.PASSWORD, sasl_mech="PLAIN")
        self.opts = opts
        self.user = user
        self.partner = "%s@%s" % (partner, opts.domain)
        self.auto_reconnect = False
        self.ssl_context = clients.client_tls_context()
        self["feature_mechanisms"].unencrypted_plain = True
        self.sent = 0
        self.sending = True
        self.got = []  # sequence numbers received from the partner
        self.error = None  # (condition, text, hint attributes or None, time)
        self.disconnected_at = None
        self.session = asyncio.Event()
        self.ended = asyncio.Event()
        self.add_event_handler("session_start", self._on_session)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)

    def go(self):
        self.connect((self.opts.host, self.opts.port), use_ssl=False, force_starttls=True, disable_starttls=False)

    def _on_session(self, _event):
        # Available: Prosody delivers messages to a bare JID only then.
        self.send_presence()
        self.session.set()

    def _on_message(self, msg):
        if msg["from"].bare == self.partner and msg["body"].startswith("seq "):
            self.got.append(int(msg["body"][4:]))

    def _on_stream_error(self, err):
        if self.error is not None:
            return
        hint = None
        for child in err.xml:
            if child.tag == "{%s}relogin" % NS_RELOGIN:
                hint = dict(child.attrib)
        self.error = (err["condition"], err["text"], hint, time.time())
        self.ended.set()

    def _on_disconnected(self, _reason):
        if self.disconnected_at is None:
            self.disconnected_at = time.time()
        self.ended.set()

    async def chat(self):
        while self.sending and not self.ended.is_set():
            self.send_message(mto=self.partner, mbody="seq %d" % self.sent, mtype="chat")
            self.sent += 1
            await asyncio.sleep(EVERY)


def admin(opts, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (opts.admin_port, path), timeout=5) as r:
        return json.load(r)


def states(opts):
    try:
        s = admin(opts, "/status")
    except OSError:
        return None, None
    return " / ".join(n["state_text"] for n in s["nodes"]), s["nodes"][0]


async def wait(cond, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(every)
    return cond()


def node_of(opts, user):
    s = admin(opts, "/users/%s@%s" % (user, opts.domain))
    return [x["node_name"] for x in s["sessions"]]


async def fresh_login(opts, user):
    c = Chatter(opts, user, user)
    c.sending = False
    c.go()
    await asyncio.wait_for(c.session.wait(), opts.timeout)
    return c


async def run(opts):
    results = []
    kind = opts.signal.lower()

    def report(name, ok, why=""):
        results.append(ok)
        name = "%s-%s" % (kind, name)
        print(("PASS %s" % name) if ok else ("FAIL %s: %s" % (name, why)), flush=True)

    def pairs(users):
        return [(users[i], users[i ^ 1]) for i in range(len(users))]

    on1 = [Chatter(opts, u, p) for u, p in pairs(opts.node1_users)]
    on2 = [Chatter(opts, u, p) for u, p in pairs(opts.node2_users)]
    everyone = on1 + on2
    for c in everyone:
        c.go()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.session.wait() for c in everyone)), opts.timeout)
    except asyncio.TimeoutError:
        report("setup", False, "not every chat client logged in: %s" % [c.user for c in everyone if not c.session.is_set()])
        return 1
    where = {c.user: node_of(opts, c.user) for c in everyone}
    wrong = [(c.user, where[c.user]) for c in on1 if where[c.user] != ["prosody1"]]
    wrong += [(c.user, where[c.user]) for c in on2 if where[c.user] != ["prosody2"]]
    report("setup-sessions-on-their-nodes", not wrong, "sessions elsewhere: %s" % wrong)
    chats = [asyncio.ensure_future(c.chat()) for c in everyone]
    if not await wait(lambda: all(len(c.got) >= 10 for c in everyone), opts.timeout):
        report("setup-chatting", False, "received: %s" % {c.user: len(c.got) for c in everyone})
        return 1

    before = len(failover.log_matches(opts.proxy_log))
    pid = int(open(opts.node1_pidfile).read().strip())
    got_at_signal = {c.user: len(c.got) for c in on2}
    t0 = time.time()
    os.kill(pid, signal.SIGKILL if opts.signal == "KILL" else signal.SIGSTOP)

    # Detection: the transition to node 2 Running in Backup Mode / Peer Down.
    found = []

    def detected():
        m = failover.log_matches(opts.proxy_log)
        if len(m) > before:
            found.append(m[before])
            return True
        return False

    if await wait(detected, opts.timeout):
        took = failover.parse_ts(found[0]) - t0
        print("interop: SIG%s of prosody1 under chat detected in %.3f s" % (opts.signal, took), flush=True)
        # A crash is seen at once by the fast path; a hang only by the
        # heartbeat timeout, counted from the last answered heartbeat (at
        # most one interval, 1 s, before the signal; plus one probe).
        low, high = (0.0, 2.0) if opts.signal == "KILL" else (opts.heartbeat_timeout - 1.5, opts.heartbeat_timeout + 2.0)
        report("detected-in-time", low <= took <= high, "took %.3f s (expected %.1f-%.1f s)" % (took, low, high))
    else:
        report("detected-in-time", False, "no transition to node 2 Running in Backup Mode / Peer Down")

    # Node 1's clients: a stream error with a re-login hint.
    await wait(lambda: all(c.error or c.disconnected_at for c in on1), opts.timeout)
    bad = []
    for c in on1:
        if c.error is None:
            bad.append("%s: no stream error (disconnected: %s)" % (c.user, c.disconnected_at is not None))
            continue
        cond, text, hint, at = c.error
        print(
            "interop: %s (node 1) got <%s/> after %.3f s, %d sent, %d received; hint %s; %s"
            % (c.user, cond, at - t0, c.sent, len(c.got), hint, text),
            flush=True,
        )
        if hint is None or hint.get("reason") not in ("node-lost", "failover"):
            bad.append("%s: <%s/> without a node-lost/failover hint (%s)" % (c.user, cond, hint))
    report("node1-clients-told-with-a-hint", not bad, "; ".join(bad))

    # A fresh login of a node-1 user lands on node 2.
    moved = None
    try:
        moved = await fresh_login(opts, opts.node1_users[0])
        where = node_of(opts, opts.node1_users[0])
        report("fresh-login-on-prosody2", where == ["prosody2"], "sessions on %s" % where)
    except Exception as e:  # noqa: BLE001
        report("fresh-login-on-prosody2", False, repr(e))

    if opts.signal == "STOP":
        # The node comes back: healthy again, then the group falls back by
        # itself, moving the moved user back with a `fallback` hint.
        seen = []

        def healthy_again():
            text, n1 = states(opts)
            if n1 is not None and n1["last_heartbeat_error"] is None and text not in seen:
                seen.append(text)
            return text == "Normal / Normal"

        t1 = time.time()
        os.kill(pid, signal.SIGCONT)
        back = await wait(healthy_again, opts.auto_fallback_after + opts.timeout, every=0.1)
        print("interop: after SIGCONT the admin API showed %s (%.3f s)" % (" -> ".join(seen), time.time() - t1), flush=True)
        report(
            "resumed-node-healthy-then-auto-fallback",
            back and seen and seen[0] == "Failed Over / Running in Backup Mode",
            "states with node 1 healthy: %s; now %s" % (seen, states(opts)[0]),
        )
        if moved is not None:
            await wait(lambda: moved.error is not None, opts.timeout)
            hint = moved.error[2] if moved.error else None
            report(
                "moved-user-told-to-fall-back",
                hint is not None and hint.get("reason") == "fallback",
                "got %s" % (moved.error,),
            )
        try:
            again = await fresh_login(opts, opts.node1_users[1])
            where = node_of(opts, opts.node1_users[1])
            report("fresh-login-on-prosody1-after-fallback", where == ["prosody1"], "sessions on %s" % where)
            again.abort()
        except Exception as e:  # noqa: BLE001
            report("fresh-login-on-prosody1-after-fallback", False, repr(e))
    if moved is not None:
        moved.abort()

    # Node 2's clients chatted on through all of it: more messages after
    # the signal, no stream error, no disconnect, and once they stop, every
    # message sent arrived, in order.
    await wait(lambda: all(len(c.got) >= got_at_signal[c.user] + 20 for c in on2), opts.timeout)
    for c in on2:
        c.sending = False
    await asyncio.gather(*chats, return_exceptions=True)
    by_jid = {"%s@%s" % (c.user, opts.domain): c for c in on2}

    def complete():
        return all(by_jid[c.partner].got == list(range(c.sent)) for c in on2)

    await wait(complete, opts.timeout)
    bad = []
    for c in on2:
        sender = by_jid[c.partner]
        after = len(c.got) - got_at_signal[c.user]
        print(
            "interop: %s (node 2) received %d of %d from %s, %d after the signal"
            % (c.user, len(c.got), sender.sent, sender.user, after),
            flush=True,
        )
        if c.error or c.disconnected_at:
            bad.append("%s: %s" % (c.user, c.error or "disconnected"))
        elif c.got != list(range(sender.sent)):
            missing = sorted(set(range(sender.sent)) - set(c.got))
            bad.append("%s: %d of %d arrived (missing %s)" % (c.user, len(c.got), sender.sent, missing[:10]))
        elif after < 20:
            bad.append("%s: only %d messages after the signal" % (c.user, after))
    report("node2-clients-chat-on-without-error-or-loss", not bad, "; ".join(bad))
    for c in everyone:
        c.abort()
    return 0 if all(results) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--domain", default="example.com")
    p.add_argument("--ca")
    p.add_argument("--signal", choices=["KILL", "STOP"], required=True)
    p.add_argument("--node1-users", nargs=4, required=True)
    p.add_argument("--node2-users", nargs=4, required=True)
    p.add_argument("--node1-pidfile", required=True)
    p.add_argument("--proxy-log", required=True)
    p.add_argument("--heartbeat-timeout", type=float, required=True)
    p.add_argument("--auto-fallback-after", type=float, default=0)
    p.add_argument("--timeout", type=float, default=20)
    opts = p.parse_args()
    clients.CA_FILE = opts.ca
    sys.exit(asyncio.run(run(opts)))


if __name__ == "__main__":
    main()
