#!/usr/bin/env python3
"""Stream management (XEP-0198) across a crash of Prosody node 1.

A sender and a receiver, slixmpp applications with the `xep_0198` plugin
(stream management with resumption, Prosody's `smacks`) that connect again
when disconnected, are relayed to node 1 (active/standby). The sender chats
to the receiver at a steady rate; node 1 is SIGKILLed in the middle of it,
both users move to node 2 and the sender goes on there. Just before the
crash node 1 is stopped (SIGSTOP) and the sender sends `--stuck` messages
that the proxy reads and forwards but no node ever handles: each must come
back as the proxy's bounce. The nodes do not
share sessions: between the crash and the receiver's return to node 2,
node 2 answers the sender's messages with an error itself.

Both sides count. Every message must be delivered or come back to its
sender as an error (lost = 0). The proxy's bounces (`<recipient-unavailable/>`,
type `wait`) must be for messages the node never acknowledged, and the
proxy's `stanzas_bounced_total` must count them. The sender's `<resume/>` on
node 2, which never issued the stream id, must fail cleanly (`<failed/>`)
and be followed by a fresh session. As a careful XEP-0198 client does, the
sender sends again, on its next session, what its old stream left neither
acknowledged nor bounced (messages the proxy never read). Prints
`sent=… delivered=… bounced=… lost=…` and `PASS name` / `FAIL name: why`.
"""

import argparse
import asyncio
import os
import signal
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402
import slixmpp  # noqa: E402

NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class Party(slixmpp.ClientXMPP):
    """A slixmpp application with stream management that comes back when
    it is disconnected."""

    def __init__(self, opts, user):
        super().__init__("%s@%s/desk" % (user, opts.domain), clients.PASSWORD, sasl_mech="PLAIN")
        self.opts = opts
        self.user = user
        self.auto_reconnect = False
        self.ssl_context = clients.client_tls_context()
        self.register_plugin("xep_0198", {"window": 1})
        self.online = False
        # Stream management enabled on the current stream: stanzas sent
        # from then on are counted (slixmpp starts the session before it).
        self.ready = False
        self.sessions = 0
        self.sm_enabled = 0
        self.sm_failed = []  # raw <failed/> of resumption attempts
        self.resumed = 0
        self.connects = 0
        self.stop = False
        self.changed = asyncio.Event()
        self.add_event_handler("session_start", self._on_session)
        self.add_event_handler("sm_enabled", self._on_enabled)
        self.add_event_handler("sm_failed", lambda st: self.sm_failed.append(str(st)))
        self.add_event_handler("session_resumed", self._on_resumed)
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
        self.sessions += 1
        self.send_presence()
        self.online = True
        self.changed.set()

    def _on_enabled(self, _event):
        self.sm_enabled += 1
        self.ready = True
        self.changed.set()

    def _on_resumed(self, _event):
        self.resumed += 1
        self.online = True
        self.ready = True
        self.changed.set()

    def _on_disconnected(self, _reason):
        self.online = False
        self.ready = False
        self.on_down()
        self.changed.set()
        if not self.stop and self.connects < 40:
            asyncio.get_event_loop().call_later(0.2, self.go)

    def on_down(self):
        pass


class Sender(Party):
    def __init__(self, opts, user, to):
        super().__init__(opts, user)
        self.to = to
        self.sent = {}  # id -> times sent
        self.acked = set()
        self.proxy_bounced = set()
        self.node_bounced = set()
        self.bad_bounces = []  # proxy bounces for acknowledged or unknown ids
        self.again = []  # to send again on the next session
        self.resent = 0
        self.add_event_handler("stanza_acked", self._on_acked)
        self.add_event_handler("message", self._on_message)

    def _on_acked(self, st):
        if st.name == "message" and st["id"]:
            self.acked.add(st["id"])
            self.changed.set()

    def _on_message(self, msg):
        if msg["type"] != "error":
            return
        mid = msg["id"]
        cond = msg["error"]["condition"]
        if cond == "recipient-unavailable" and msg["error"]["type"] == "wait":
            if mid in self.acked or mid not in self.sent:
                self.bad_bounces.append(mid)
            self.proxy_bounced.add(mid)
        else:
            self.node_bounced.add(mid)
        self.changed.set()

    def settled(self, mid):
        return mid in self.acked or mid in self.proxy_bounced or mid in self.node_bounced

    def on_down(self):
        # What the old stream left neither acknowledged nor bounced never
        # reached a node: send it again on the next session.
        self.again = [m for m in self.sent if not self.settled(m)]


class Receiver(Party):
    def __init__(self, opts, user):
        super().__init__(opts, user)
        self.got = set()
        self.add_event_handler("message", self._on_message)

    def _on_message(self, msg):
        if msg["type"] == "chat":
            self.got.add(msg["body"])
            self.changed.set()


def authenticated(log, user):
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read().count("Authenticated as %s@example.com" % user)


def metric(admin, series):
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return int(float(line.split()[1]))
    return None


UP = 'prg_proxy_stanzas_total{direction="client_to_node"}'


async def wait_until(cond, timeout, *parties):
    deadline = time.monotonic() + timeout
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not parties:
            # A condition on the proxy's metrics: poll it.
            await asyncio.sleep(min(left, 0.05))
            continue
        for p in parties:
            p.changed.clear()
        waits = [asyncio.ensure_future(p.changed.wait()) for p in parties]
        await asyncio.wait(waits, timeout=min(left, 0.5), return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    return True


async def run(opts):
    results = []

    def report(name, ok, why=""):
        results.append(ok)
        print(("PASS %s" % name) if ok else ("FAIL %s: %s" % (name, why)), flush=True)

    to = "%s@%s" % (opts.receiver, opts.domain)
    rx = Receiver(opts, opts.receiver)
    tx = Sender(opts, opts.sender, to)
    rx.go()
    tx.go()
    if not await wait_until(lambda: rx.online and tx.ready and rx.ready, opts.timeout, rx, tx):
        report("sm-setup", False, "sender and receiver did not both log in with stream management on")
        tx.stop = rx.stop = True
        tx.abort()
        rx.abort()
        return 1
    on2_before = authenticated(opts.node2_log, opts.sender)
    bounced_before = metric(opts.admin, "prg_proxy_stanzas_bounced_total") or 0

    # Messages have our own ids: slixmpp's send_message takes none, so build them.
    def send(mid):
        m = tx.make_message(mto=to, mbody=mid, mtype="chat")
        m["id"] = mid
        tx.sent[mid] = tx.sent.get(mid, 0) + 1
        m.send()

    pid = int(open(opts.node1_pidfile).read().strip())
    killed = False
    stuck = []  # sent while node 1 was stopped: never acknowledged
    i = 0
    deadline = time.monotonic() + opts.timeout + 10
    while i < opts.messages and time.monotonic() < deadline:
        if i == opts.kill_at and not killed:
            # Node 1 stops (SIGSTOP) with the chat going on; what the
            # sender sends now reaches the proxy, which forwards it, but no
            # node handles it. Once the proxy has read all of it (each
            # message and slixmpp's <r/>: two stanzas), node 1 crashes.
            os.kill(pid, signal.SIGSTOP)
            up = metric(opts.admin, UP)
            for k in range(opts.stuck):
                stuck.append("m%d" % i)
                send("m%d" % i)
                i += 1
                await asyncio.sleep(opts.interval)
            await wait_until(lambda: metric(opts.admin, UP) >= up + 2 * opts.stuck, opts.timeout)
            os.kill(pid, signal.SIGKILL)
            killed = True
            # Nothing more until the stream has ended.
            await wait_until(lambda: not tx.ready, opts.timeout, tx)
            continue
        if not tx.ready:
            await wait_until(lambda: tx.ready, 1.0, tx)
            continue
        while tx.again and tx.ready:
            send(tx.again.pop(0))
            tx.resent += 1
        send("m%d" % i)
        i += 1
        await asyncio.sleep(opts.interval)
    while tx.again and await wait_until(lambda: tx.ready, opts.timeout, tx):
        send(tx.again.pop(0))
        tx.resent += 1

    # Everything acknowledged or bounced; then a last message once the
    # receiver is back: when it arrives, every earlier one has.
    # slixmpp sends its <r/> ahead of the stanza that fills the window:
    # the last message needs one more request.
    t_settle = time.monotonic()
    ok_settled = False
    while not ok_settled and time.monotonic() - t_settle < opts.timeout:
        if tx.ready:
            tx["xep_0198"].request_ack()
        ok_settled = await wait_until(lambda: all(tx.settled(m) for m in tx.sent), 1.0, tx)
    unsettled = [m for m in tx.sent if not tx.settled(m)]
    print("interop: sm-failover settled in %.3f s; unsettled %s; sender ready=%s sessions=%d acked=%d"
          % (time.monotonic() - t_settle, unsettled[:10], tx.ready, tx.sessions, len(tx.acked)), flush=True)
    fin_got = False
    for k in range(20):
        if not await wait_until(lambda: rx.online and tx.ready, opts.timeout, rx, tx):
            break
        mid = "fin%d" % k
        send(mid)
        await wait_until(lambda: mid in rx.got or tx.settled(mid) and mid not in tx.acked, opts.timeout, rx, tx)
        if mid in rx.got:
            fin_got = True
            break
    ids = [m for m in tx.sent if not m.startswith("fin")]
    delivered = {m for m in ids if m in rx.got}
    bounced = {m for m in ids if m in tx.proxy_bounced or m in tx.node_bounced}
    lost = [m for m in ids if m not in delivered and m not in bounced]
    acked_lost = [m for m in lost if m in tx.acked]
    print(
        "interop: sm-failover sent=%d delivered=%d bounced=%d lost=%d "
        "(bounced by the proxy %d, by prosody2 %d; delivered and bounced %d; resent %d; lost after a node ack %d)"
        % (
            len(ids),
            len(delivered),
            len(bounced),
            len(lost),
            len(tx.proxy_bounced),
            len(tx.node_bounced),
            len(delivered & bounced),
            tx.resent,
            len(acked_lost),
        ),
        flush=True,
    )
    report("sm-failover-setup", killed and ok_settled and fin_got,
           "killed=%s fin delivered=%s; neither acknowledged nor bounced: %s" % (killed, fin_got, unsettled[:20]))
    report("sm-failover-nothing-lost", not lost, "lost %s (of which acknowledged by a node: %s)" % (lost[:20], acked_lost[:20]))
    report("sm-failover-bounces-only-unacknowledged", not tx.bad_bounces,
           "proxy bounced acknowledged or unknown ids %s" % tx.bad_bounces[:20])
    not_bounced = [m for m in stuck if m not in tx.proxy_bounced]
    report(
        "sm-failover-unacknowledged-all-bounced",
        stuck and not not_bounced and tx.resent == 0,
        "sent while node 1 was stopped and not bounced by the proxy: %s; sent again: %d" % (not_bounced, tx.resent),
    )
    bounced_after = metric(opts.admin, "prg_proxy_stanzas_bounced_total")
    report(
        "sm-failover-bounces-counted-in-metrics",
        bounced_after is not None and bounced_after - bounced_before == len(tx.proxy_bounced),
        "metric %s -> %s, sender got %d" % (bounced_before, bounced_after, len(tx.proxy_bounced)),
    )
    resumed_ok = (
        tx.resumed == 0
        and any("item-not-found" in f for f in tx.sm_failed)
        and tx.sessions >= 2
        and tx.sm_enabled >= 2
        and authenticated(opts.node2_log, opts.sender) > on2_before
    )
    report(
        "sm-resume-on-prosody2-fails-cleanly",
        resumed_ok,
        "resumed=%d failed=%s sessions=%d enabled=%d" % (tx.resumed, tx.sm_failed, tx.sessions, tx.sm_enabled),
    )
    tx.stop = rx.stop = True
    tx.abort()
    rx.abort()
    return 0 if all(results) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", default="example.com")
    p.add_argument("--ca")
    p.add_argument("--sender", default="smsender")
    p.add_argument("--receiver", default="smreceiver")
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--kill-at", type=int, default=100)
    p.add_argument("--stuck", type=int, default=10, help="messages sent while node 1 is stopped, before the SIGKILL")
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--node1-pidfile", required=True)
    p.add_argument("--node2-log", required=True)
    p.add_argument("--admin", required=True, help="the proxy's admin API, http://127.0.0.1:PORT")
    p.add_argument("--timeout", type=float, default=20)
    opts = p.parse_args()
    clients.CA_FILE = opts.ca
    sys.exit(asyncio.run(run(opts)))


if __name__ == "__main__":
    main()
