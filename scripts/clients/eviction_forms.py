#!/usr/bin/python3
"""Measure how real XMPP client libraries react when the server (prg-proxy)
ends a logged-in stream, and how they take login-time refusals.

A fake XMPP server (asyncio, STARTTLS with the dev cert in certs/, SASL PLAIN
accepting any password, bind, session, roster/ping/disco answers) runs on
127.0.0.1 on ports picked at run time. For each (client, case) it starts the
client library as a subprocess, lets it log in, and 0.5 s after the resource
is bound (first session only) sends the eviction form under test; later
sessions are left alone. Every TCP connection, SASL attempt and bind is
recorded with its time, as is every event the client prints ('EV ...').
Login-refusal cases refuse every SASL <auth> during the whole window.

usage: eviction_forms.py [--window S] [--jobs N] [--clients a,b] [--cases x,y]
       [--json FILE] [--verbose]
Run through run.sh, which installs what is needed.
"""
import argparse
import asyncio
import json
import os
import socket
import ssl
import struct
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CERTS = os.path.join(REPO, "certs")
CA = os.path.join(CERTS, "dev-ca.pem")
VENV_PY = os.environ.get("AIOXMPP_PYTHON", "/tmp/prg-proxy-clients-venv/bin/python")

NS_STREAM = "http://etherx.jabber.org/streams"
NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"

RELOGIN = ("<relogin xmlns='urn:x-prg-proxy:relogin:0' after='5' min='2' "
           "max='10' reason='failover'/>")

EVICT_CONDS = ["system-shutdown", "remote-connection-failed", "reset",
               "resource-constraint", "policy-violation", "connection-timeout"]
EVICT_CASES = ([f"err:{c}" for c in EVICT_CONDS]
               + ["see-other-host:self", "see-other-host:alt", "see-other-host:dns",
                  "close-stream", "fin", "rst"])
LOGIN_CASES = ["login:temporary-auth-failure", "login:resource-constraint",
               "login:resource-constraint-after5s"]
# see-other-host:dns: the client's JID domain is 'localhost' and the second
# listener sits on 127.0.0.1:5222 (where DNS for the domain leads); the
# redirect names the main port. Tells "follows the named host" from "goes back
# to its domain's DNS target". Runs one at a time (fixed port).
DNS_PORT = 5222
DNS_LOCK = None
ALL_CASES = EVICT_CASES + LOGIN_CASES


def client_cmds(host, port):
    return {
        "slixmpp-plain": ["/usr/bin/python3", os.path.join(HERE, "slix_client.py"),
                          host, str(port), CA, "plain"],
        "slixmpp-reconnect": ["/usr/bin/python3", os.path.join(HERE, "slix_client.py"),
                              host, str(port), CA, "reconnect"],
        "xmppjs": ["node", os.path.join(HERE, "xmppjs_client.mjs"), host, str(port)],
        "aioxmpp": [VENV_PY, os.path.join(HERE, "aioxmpp_client.py"), host, str(port)],
    }


ALL_CLIENTS = ["slixmpp-plain", "slixmpp-reconnect", "xmppjs", "aioxmpp"]


def server_tls_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(CERTS, "dev-cert.pem"),
                        os.path.join(CERTS, "dev-key.pem"))
    return ctx


class StreamParser:
    """Incremental parser: yields ('open', attrs), ('elem', Element), ('close',)."""

    def __init__(self):
        self.p = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.root = None

    def feed(self, data):
        self.p.feed(data)
        out = []
        for ev, el in self.p.read_events():
            if ev == "start":
                self.depth += 1
                if self.depth == 1:
                    self.root = el
                    out.append(("open", dict(el.attrib)))
            else:
                self.depth -= 1
                if self.depth == 1:
                    out.append(("elem", el))
                    self.root.remove(el)
                elif self.depth == 0:
                    out.append(("close", None))
        return out


class Run:
    """One (client, case) run: its fake server, its records."""

    def __init__(self, client, case, window, verbose=False):
        self.client, self.case, self.window, self.verbose = client, case, window, verbose
        self.t0 = None
        self.records = []          # (t, source, what)
        self.conns = 0
        self.evicted_at = None
        self.done = asyncio.Event()
        self.ports = {}
        self.tls = server_tls_context()

    def now(self):
        return round(time.monotonic() - self.t0, 3)

    def rec(self, source, what):
        self.records.append((self.now(), source, what))
        if self.verbose:
            print(f"  [{self.client} {self.case}] {self.now():7.3f} {source}: {what}", flush=True)

    async def handle(self, reader, writer, port_name):
        self.conns += 1
        cid = self.conns
        self.rec("server", f"conn#{cid} connect port={port_name}")
        parser = StreamParser()
        st = {"tls": False, "authed": False, "bound": False}

        def send(s):
            writer.write(s.encode())

        async def evict():
            await asyncio.sleep(0.5)
            if writer.is_closing():
                return
            self.evicted_at = self.now()
            case = self.case
            self.rec("server", f"conn#{cid} evict {case}")
            if case.startswith("err:"):
                cond = case[4:]
                send(f"<stream:error><{cond} xmlns='{NS_STREAMS_ERR}'/>"
                     f"<text xmlns='{NS_STREAMS_ERR}'>node failover, log in again</text>"
                     f"{RELOGIN}</stream:error></stream:stream>")
                await writer.drain()
                writer.close()
            elif case.startswith("see-other-host:"):
                port = self.ports["alt"] if case.endswith(":alt") else self.ports["main"]
                send(f"<stream:error><see-other-host xmlns='{NS_STREAMS_ERR}'>127.0.0.1:{port}"
                     f"</see-other-host></stream:error></stream:stream>")
                await writer.drain()
                writer.close()
            elif case == "close-stream":
                send("</stream:stream>")
                await writer.drain()
                writer.close()
            elif case == "fin":
                writer.close()
            elif case == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

        try:
            while not writer.is_closing():
                try:
                    data = await reader.read(65536)
                except (ConnectionError, ssl.SSLError) as e:
                    self.rec("server", f"conn#{cid} read error {type(e).__name__}")
                    break
                if not data:
                    self.rec("server", f"conn#{cid} EOF from client")
                    break
                try:
                    events = parser.feed(data)
                except ET.ParseError as e:
                    self.rec("server", f"conn#{cid} parse error {e}")
                    break
                restart = False
                for kind, el in events:
                    if kind == "open":
                        st["domain"] = el.get("to") or "example.com"
                        send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                             f"xmlns:stream='{NS_STREAM}' id='{uuid.uuid4().hex}' "
                             f"from='{escape(st['domain'])}' version='1.0' xml:lang='en'>")
                        if not st["tls"]:
                            feats = f"<starttls xmlns='{NS_TLS}'><required/></starttls>"
                        elif not st["authed"]:
                            feats = (f"<mechanisms xmlns='{NS_SASL}'>"
                                     "<mechanism>PLAIN</mechanism></mechanisms>")
                        else:
                            feats = (f"<bind xmlns='{NS_BIND}'/>"
                                     f"<session xmlns='{NS_SESSION}'><optional/></session>")
                        send(f"<stream:features>{feats}</stream:features>")
                    elif kind == "close":
                        self.rec("server", f"conn#{cid} client closed stream")
                        send("</stream:stream>")
                        writer.close()
                    elif el.tag == f"{{{NS_TLS}}}starttls":
                        send(f"<proceed xmlns='{NS_TLS}'/>")
                        await writer.drain()
                        await writer.start_tls(self.tls)
                        st["tls"] = True
                        parser = StreamParser()
                        restart = True
                    elif el.tag == f"{{{NS_SASL}}}auth":
                        self.rec("server", f"conn#{cid} sasl auth {el.get('mechanism')}")
                        if self.case == "login:temporary-auth-failure":
                            send(f"<failure xmlns='{NS_SASL}'><temporary-auth-failure/>"
                                 "<text>backend unavailable, try later</text></failure>")
                        elif self.case.startswith("login:resource-constraint"):
                            if self.case.endswith("after5s"):
                                await asyncio.sleep(5)
                            send(f"<stream:error><resource-constraint xmlns='{NS_STREAMS_ERR}'/>"
                                 f"<text xmlns='{NS_STREAMS_ERR}'>no backend, try later</text>"
                                 f"{RELOGIN}</stream:error></stream:stream>")
                            await writer.drain()
                            writer.close()
                        else:
                            send(f"<success xmlns='{NS_SASL}'/>")
                            st["authed"] = True
                            parser = StreamParser()
                            restart = True
                    elif el.tag == f"{{{NS_SASL}}}abort":
                        self.rec("server", f"conn#{cid} sasl abort")
                        send(f"<failure xmlns='{NS_SASL}'><aborted/></failure>")
                    elif el.tag == "{jabber:client}iq":
                        self.handle_iq(el, send, st, cid, evict)
                    elif el.tag == "{jabber:client}presence":
                        pass
                    else:
                        self.rec("server", f"conn#{cid} unhandled {el.tag}")
                    if restart:
                        break
                await writer.drain()
        except Exception as e:  # record, never crash the harness
            self.rec("server", f"conn#{cid} handler error {type(e).__name__}: {e}")
        finally:
            if not writer.is_closing():
                writer.close()
            self.rec("server", f"conn#{cid} closed")

    def handle_iq(self, el, send, st, cid, evict):
        typ, iid = el.get("type"), el.get("id", "")
        if typ in ("result", "error"):
            return
        child = el[0] if len(el) else None
        tag = child.tag if child is not None else ""
        if tag == f"{{{NS_BIND}}}bind":
            res = child.findtext(f"{{{NS_BIND}}}resource") or "r"
            send(f"<iq type='result' id='{escape(iid)}'><bind xmlns='{NS_BIND}'>"
                 f"<jid>alice@{escape(st.get('domain', 'example.com'))}/{escape(res)}</jid></bind></iq>")
            st["bound"] = True
            self.rec("server", f"conn#{cid} bound")
            if self.case in EVICT_CASES and self.evicted_at is None:
                asyncio.ensure_future(evict())
        elif tag == f"{{{NS_SESSION}}}session":
            send(f"<iq type='result' id='{escape(iid)}'/>")
        elif tag == "{jabber:iq:roster}query" and typ == "get":
            send(f"<iq type='result' id='{escape(iid)}'><query xmlns='jabber:iq:roster'/></iq>")
        elif tag == "{urn:xmpp:ping}ping":
            send(f"<iq type='result' id='{escape(iid)}'/>")
        elif tag == "{http://jabber.org/protocol/disco#info}query" and typ == "get":
            send(f"<iq type='result' id='{escape(iid)}'>"
                 "<query xmlns='http://jabber.org/protocol/disco#info'>"
                 "<identity category='server' type='im'/></query></iq>")
        else:
            send(f"<iq type='error' id='{escape(iid)}'><error type='cancel'>"
                 "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                 "</error></iq>")

    async def read_client(self, stream, name):
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text.startswith("EV "):
                self.rec("client", text[3:])
            elif self.verbose:
                print(f"  [{self.client} {self.case}] {name}: {text[:200]}", flush=True)

    def settled(self):
        """Stop early 5 s after the client came back and bound again."""
        binds = [t for t, s, w in self.records if s == "server" and w.endswith(" bound")]
        if self.evicted_at is not None and len(binds) >= 2:
            return self.now() - binds[1] > 5
        return self.conns > 60   # hammering: enough seen

    async def go(self):
        self.t0 = time.monotonic()
        servers = {}
        dns = self.case == "see-other-host:dns"
        for name in ("main", "alt"):
            srv = await asyncio.start_server(
                lambda r, w, n=name: self.handle(r, w, n), "127.0.0.1",
                DNS_PORT if (dns and name == "alt") else 0)
            servers[name] = srv
            self.ports[name] = srv.sockets[0].getsockname()[1]
        cmd = client_cmds("127.0.0.1", self.ports["main"])[self.client]
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=CA, NODE_PATH=os.path.join(HERE, "node_modules"),
                   PROBE_DOMAIN="localhost" if dns else "example.com")
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=HERE, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        readers = [asyncio.ensure_future(self.read_client(proc.stdout, "stdout")),
                   asyncio.ensure_future(self.read_client(proc.stderr, "stderr"))]
        deadline = self.t0 + self.window
        while time.monotonic() < deadline and proc.returncode is None and not self.settled():
            await asyncio.sleep(0.2)
        if proc.returncode is not None:
            self.rec("harness", f"client exited rc={proc.returncode}")
        else:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for r in readers:
            r.cancel()
        for srv in servers.values():
            srv.close()
        return self.summary()

    def summary(self):
        conns = [(t, w) for t, s, w in self.records if s == "server" and " connect port=" in w]
        binds = [t for t, s, w in self.records if s == "server" and w.endswith(" bound")]
        auths = [t for t, s, w in self.records if s == "server" and " sasl auth " in w]
        cev = [(t, w) for t, s, w in self.records if s == "client"]
        out = {"client": self.client, "case": self.case, "window": self.window,
               "connections": len(conns), "records": self.records}
        if self.case in EVICT_CASES:
            ev = self.evicted_at
            out["evicted_at"] = ev
            later = [(t, w) for t, w in conns if ev is not None and t >= ev]
            out["reconnect_after"] = round(later[0][0] - ev, 2) if later else None
            out["reconnect_port"] = later[0][1].split("port=")[1] if later else None
            out["relogin_after"] = round(binds[1] - ev, 2) if len(binds) > 1 else None
            out["reconnects"] = len(later)
            out["conn_times"] = [round(t - ev, 2) for t, _ in later]
        else:
            out["auth_attempts"] = [round(t, 2) for t in auths]
            out["conn_times"] = [round(t, 2) for t, _ in conns]
        out["client_events"] = [f"{t:.2f} {w}" for t, w in cev][:40]
        return out


def fmt(s):
    if s["case"] in EVICT_CASES:
        if s.get("evicted_at") is None:
            return f"{s['client']:18} {s['case']:30} NEVER LOGGED IN"
        if s["relogin_after"] is not None:
            res = (f"BACK: reconnect +{s['reconnect_after']}s (port {s['reconnect_port']}), "
                   f"relogin +{s['relogin_after']}s, conns after evict: {s['reconnects']}")
        elif s["reconnects"]:
            res = f"reconnected but no relogin; conns at {s['conn_times']}"
        else:
            res = f"NO reconnect within {s['window']}s"
            fails = [e for e in s["client_events"] if "connection_failed" in e]
            if fails:
                res += (f" (client tried elsewhere {len(fails)}x: "
                        f"{fails[0].split(' ', 2)[2][:60]})")
        return f"{s['client']:18} {s['case']:30} {res}"
    n = s["connections"]
    span = s["conn_times"][-1] - s["conn_times"][0] if n > 1 else 0
    return (f"{s['client']:18} {s['case']:30} {n} connection(s) in {span:.2f}s, "
            f"{len(s['auth_attempts'])} SASL <auth>; connections at {s['conn_times'][:8]}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=30.0, help="max seconds per run")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--clients", default=",".join(ALL_CLIENTS))
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--json", default=None, help="write full records here")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    sem = asyncio.Semaphore(a.jobs)
    results = []

    global DNS_LOCK
    DNS_LOCK = asyncio.Lock()

    async def one(client, case):
        async with sem:
            if case == "see-other-host:dns":
                async with DNS_LOCK:
                    s = await Run(client, case, a.window, a.verbose).go()
            else:
                s = await Run(client, case, a.window, a.verbose).go()
            print(fmt(s), flush=True)
            if a.verbose or s["case"] in LOGIN_CASES:
                for line in s["client_events"][:15]:
                    print(f"    client: {line}", flush=True)
            results.append(s)

    await asyncio.gather(*(one(c, k) for c in a.clients.split(",") for k in a.cases.split(",")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(sorted(results, key=lambda s: (s["client"], s["case"])), f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
