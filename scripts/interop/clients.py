#!/usr/bin/python3
"""Interop client checks for prg-proxy: real XMPP clients (slixmpp) plus a raw
socket client, against the proxy (default) or straight against a node (--no-tls).

Prints one line per check, ``PASS name`` or ``FAIL name: reason``, then
``<N> passed, <M> failed``; exits 0 only if nothing failed. Every check is bounded
by --timeout seconds.

Run with Debian's /usr/bin/python3 (python3-slixmpp), e.g.

    /usr/bin/python3 scripts/interop/clients.py --host 127.0.0.1 --port 5222 \
        --direct-tls-port 5223 --domain example.com
    /usr/bin/python3 scripts/interop/clients.py --host 127.0.0.1 --port 5222 \
        --domain example.com --no-tls          # baseline straight against Prosody

Test users (registered on both nodes by scripts/interop.sh, password "pw"):
alice, bob, carol, mutual roster contacts (subscription both).
"""

import argparse
import asyncio
import base64
import logging
import re
import ssl
import sys
import time
import traceback

import slixmpp

PASSWORD = "pw"
# Multi-byte UTF-8: 2-byte (accents), 3-byte (CJK), 4-byte (emoji, incl. ZWJ sequence).
UNICODE_TEXT = "Grüße, Åsa! Ça va? — 你好，世界 こんにちは 🎉🚀 👩‍💻 ∑≠∞"
UNICODE_REPLY = "Merci, très bien 👍 — 谢谢！ ありがとう 🙂 ünïcödé"
BIG_STANZA_BYTES = 300 * 1024

STREAM_NS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"


class CheckFailed(Exception):
    pass


CA_FILE = None  # --ca: verify the server certificate against this CA


def client_tls_context(alpn=None):
    """TLS context for the test clients. With --ca the server certificate must
    chain to that CA and name the domain (SNI is the domain); without it the
    proxy's development certificate is accepted unverified."""
    ctx = ssl.create_default_context()
    if CA_FILE:
        ctx = ssl.create_default_context(cafile=CA_FILE)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# ------------------------------------------------------------------ slixmpp side


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what the checks need to look at."""

    def __init__(self, opts, user, resource, mech, direct_tls=False):
        jid = "%s@%s/%s" % (user, opts.domain, resource)
        super().__init__(jid, PASSWORD, sasl_mech=mech)
        self.opts = opts
        self.user = user
        self.wanted_mech = mech
        self.direct_tls = direct_tls
        self.register_plugin("xep_0199")  # ping
        self.register_plugin("xep_0030")  # disco (needed by ping)
        # allow PLAIN where slixmpp cannot see the TLS layer (direct TLS via
        # asyncio) and in --no-tls baseline mode against a plain-TCP node
        self["feature_mechanisms"].unencrypted_plain = True
        self.ssl_context = client_tls_context(["xmpp-client"] if direct_tls else None)
        self.auto_reconnect = False

        self.ev_session = asyncio.Event()
        self.ev_failed = asyncio.Event()
        self.failure = None
        self.offered_mechs = set()
        self.used_mech = None
        self.tls_used = False
        self.tls_version = None
        self.alpn = None
        self.messages = asyncio.Queue()
        self.available = {}  # bare jid -> asyncio.Event
        self.stream_errors = []

        self.add_event_handler("stream_negotiated", self._on_negotiated)
        self.add_event_handler("session_start", self._on_session)
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.add_event_handler("failed_all_auth", self._on_failed_all_auth)
        self.add_event_handler("no_auth", self._on_failed_all_auth)
        self.add_event_handler("connection_failed", self._on_conn_failed)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("presence_available", self._on_available)
        self.add_event_handler("auth_success", self._on_auth_success)

    def presence_event(self, bare):
        return self.available.setdefault(str(bare), asyncio.Event())

    def _fail(self, why):
        if self.failure is None:
            self.failure = why
        self.ev_failed.set()

    def _on_auth_success(self, _stanza):
        mechs = self["feature_mechanisms"]
        self.offered_mechs = set(mechs.mech_list)
        self.used_mech = mechs.mech.name if mechs.mech else None

    def _on_negotiated(self, _event):
        pass

    def _on_session(self, _event):
        transport = self.transport
        if transport is not None:
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is not None:
                self.tls_used = True
                self.tls_version = sslobj.version()
                self.alpn = sslobj.selected_alpn_protocol()
        self.ev_session.set()

    def _on_failed_auth(self, stanza):
        cond = stanza["condition"] if stanza is not None else "?"
        self._fail("SASL failure (%s) with %s" % (cond, self.wanted_mech))

    def _on_failed_all_auth(self, _event):
        self._fail(
            "no usable SASL mechanism (wanted %s, offered %s)"
            % (self.wanted_mech, sorted(self["feature_mechanisms"].mech_list))
        )

    def _on_conn_failed(self, err):
        self._fail("connection failed: %s" % (err,))

    def _on_stream_error(self, err):
        self.stream_errors.append(err)
        self._fail("stream error: %s %s" % (err["condition"], err["text"]))

    def _on_disconnected(self, reason):
        if not self.ev_session.is_set():
            self._fail("disconnected before the session started (%s)" % (reason,))

    def _on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            self.messages.put_nowait(msg)

    def _on_available(self, pres):
        self.presence_event(pres["from"].bare).set()

    async def login(self):
        """Connect, TLS, SASL with the wanted mechanism, bind. Raises CheckFailed."""
        self.init_plugins()
        address = (self.opts.host, self.opts.port)
        if self.direct_tls:
            address = (self.opts.host, self.opts.direct_tls_port)
            self.connect(address, use_ssl=True, force_starttls=False, disable_starttls=True)
        elif self.opts.no_tls:
            self.connect(address, use_ssl=False, force_starttls=False, disable_starttls=True)
        else:
            self.connect(address, use_ssl=False, force_starttls=True, disable_starttls=False)
        done, _ = await asyncio.wait(
            [
                asyncio.ensure_future(self.ev_session.wait()),
                asyncio.ensure_future(self.ev_failed.wait()),
            ],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self.ev_session.is_set():
            raise CheckFailed("%s login: %s" % (self.user, self.failure))
        if self.wanted_mech and self.used_mech != self.wanted_mech:
            raise CheckFailed(
                "%s authenticated with %s, wanted %s" % (self.user, self.used_mech, self.wanted_mech)
            )
        if not self.opts.no_tls and not self.tls_used:
            raise CheckFailed("%s: session is not TLS-protected" % self.user)
        return self

    async def roster_contains(self, *bares):
        await self.get_roster(timeout=self.opts.timeout)
        roster = self.client_roster
        missing = [b for b in bares if b not in roster]
        if missing:
            raise CheckFailed(
                "%s's roster lacks %s (has %s)" % (self.user, missing, list(roster.keys()))
            )
        for b in bares:
            sub = roster[b]["subscription"]
            if sub != "both":
                raise CheckFailed("%s's roster item %s has subscription %r" % (self.user, b, sub))

    async def close(self):
        try:
            if self.transport is not None:
                await asyncio.wait_for(self.disconnect(wait=1.0), 3)
        except Exception:
            pass
        try:
            self.abort()
        except Exception:
            pass


async def expect_message(client, sender_bare, body):
    while True:
        msg = await client.messages.get()
        if msg["from"].bare != sender_bare:
            continue
        got = msg["body"]
        if got != body:
            raise CheckFailed(
                "%s received a different body: %r (utf-8 %s) != sent %r (utf-8 %s)"
                % (
                    client.user,
                    got,
                    got.encode("utf-8").hex(),
                    body,
                    body.encode("utf-8").hex(),
                )
            )
        if got.encode("utf-8") != body.encode("utf-8"):
            raise CheckFailed("UTF-8 bytes differ")
        return msg


# ------------------------------------------------------------------ raw side


class RawStream:
    """A minimal XMPP client on asyncio streams, to send what real clients never
    send (DTDs, huge stanzas) and to look at the wire features directly."""

    def __init__(self, opts):
        self.opts = opts
        self.reader = None
        self.writer = None
        self.buf = b""
        self.tls = False

    async def open(self, direct_tls=False):
        if direct_tls:
            self.reader, self.writer = await asyncio.open_connection(
                self.opts.host,
                self.opts.direct_tls_port,
                ssl=client_tls_context(["xmpp-client"]),
                server_hostname=self.opts.domain,
            )
            self.tls = True
        else:
            self.reader, self.writer = await asyncio.open_connection(self.opts.host, self.opts.port)

    def ssl_object(self):
        return self.writer.get_extra_info("ssl_object")

    async def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.writer.write(data)
        await self.writer.drain()

    async def read_until(self, pattern, what):
        """Read until `pattern` (regex, bytes) matches the buffer; return the match
        and consume the buffer up to its end."""
        rx = re.compile(pattern, re.S)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            chunk = await self.reader.read(65536)
            if not chunk:
                raise CheckFailed(
                    "connection closed while waiting for %s; got %r" % (what, self.buf[-600:])
                )
            self.buf += chunk

    async def read_all(self, limit=1 << 20):
        """Read until the peer closes the stream or the connection (or `limit`)."""
        while len(self.buf) < limit:
            try:
                chunk = await self.reader.read(65536)
            except (ConnectionError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            self.buf += chunk
            if b"</stream:stream>" in self.buf:
                break
        return self.buf

    async def stream_header(self):
        await self.send(
            "<?xml version='1.0'?><stream:stream to='%s' version='1.0' "
            "xmlns='jabber:client' xmlns:stream='%s'>" % (self.opts.domain, STREAM_NS)
        )

    async def features(self):
        m = await self.read_until(rb"<(?:stream:)?features.*?</(?:stream:)?features>", "stream features")
        return m.group(0).decode("utf-8", "replace")

    async def open_secure(self):
        """Open a stream and get it to the post-TLS features (STARTTLS or direct TLS,
        or plain in --no-tls mode); return those features."""
        if self.opts.no_tls:
            await self.open()
            await self.stream_header()
            return await self.features()
        await self.open()
        await self.stream_header()
        feats = await self.features()
        if "<starttls" not in feats:
            raise CheckFailed("no <starttls/> offered before TLS: %s" % feats)
        await self.send("<starttls xmlns='%s'/>" % TLS_NS)
        await self.read_until(rb"<proceed[^>]*/>|<proceed[^>]*>\s*</proceed>", "<proceed/>")
        await self.writer.start_tls(client_tls_context(), server_hostname=self.opts.domain)
        self.tls = True
        self.buf = b""
        await self.stream_header()
        return await self.features()

    async def login(self, user):
        feats = await self.open_secure()
        mechs = mechanisms_of(feats)
        if "PLAIN" not in mechs:
            raise CheckFailed("PLAIN not offered (%s)" % mechs)
        token = base64.b64encode(("\0%s\0%s" % (user, PASSWORD)).encode()).decode()
        await self.send("<auth xmlns='%s' mechanism='PLAIN'>%s</auth>" % (SASL_NS, token))
        m = await self.read_until(rb"<success[^>]*/>|<success.*?</success>|<failure.*?</failure>", "SASL result")
        if m.group(0).startswith(b"<failure"):
            raise CheckFailed("raw PLAIN login failed: %r" % m.group(0))
        await self.stream_header()
        await self.features()
        await self.send(
            "<iq type='set' id='bind1'><bind xmlns='%s'><resource>raw</resource></bind></iq>" % BIND_NS
        )
        m = await self.read_until(rb"<iq[^>]*id=['\"]bind1['\"].*?</iq>|<iq[^>]*id=['\"]bind1['\"][^>]*/>", "bind result")
        if b"type='result'" not in m.group(0) and b'type="result"' not in m.group(0):
            raise CheckFailed("bind failed: %r" % m.group(0))

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass


def mechanisms_of(features_xml):
    return re.findall(r"<mechanism>\s*([^<\s]+)\s*</mechanism>", features_xml)


# ------------------------------------------------------------------ checks


class Suite:
    def __init__(self, opts):
        self.opts = opts
        self.passed = 0
        self.failed = 0
        self.clients = {}
        self.cleanup = []

    async def check(self, name, coro_fn):
        start = time.monotonic()
        try:
            await asyncio.wait_for(coro_fn(), self.opts.timeout)
        except asyncio.TimeoutError:
            self.failed += 1
            print("FAIL %s: timed out after %ss" % (name, self.opts.timeout), flush=True)
            return False
        except CheckFailed as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e), flush=True)
            return False
        except Exception as e:  # a bug in the check itself, or an unexpected error
            self.failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e), flush=True)
            if self.opts.verbose:
                traceback.print_exc()
            return False
        self.passed += 1
        print("PASS %s (%.1fs)" % (name, time.monotonic() - start), flush=True)
        return True

    def need(self, *names):
        for n in names:
            if n not in self.clients:
                raise CheckFailed("skipped: %s is not logged in (an earlier check failed)" % n)
        return [self.clients[n] for n in names]

    def new_client(self, user, resource, mech, direct_tls=False):
        c = Client(self.opts, user, resource, mech, direct_tls)
        self.cleanup.append(c)
        return c

    # --- logins, roster, presence

    async def alice_scram_login(self):
        c = self.new_client("alice", "interop", "SCRAM-SHA-1")
        await c.login()
        if any(m.endswith("-PLUS") for m in c.offered_mechs) and not self.opts.no_tls:
            raise CheckFailed("channel-binding mechanisms offered: %s" % sorted(c.offered_mechs))
        await c.roster_contains("bob@%s" % self.opts.domain)
        c.send_presence(pstatus="alice via interop")
        self.clients["alice"] = c

    async def bob_plain_login(self):
        c = self.new_client("bob", "interop", "PLAIN")
        await c.login()
        await c.roster_contains("alice@%s" % self.opts.domain)
        c.send_presence(pstatus="bob via interop")
        self.clients["bob"] = c

    async def mutual_presence(self):
        alice, bob = self.need("alice", "bob")
        d = self.opts.domain
        await alice.presence_event("bob@" + d).wait()
        await bob.presence_event("alice@" + d).wait()

    async def unicode_message(self):
        alice, bob = self.need("alice", "bob")
        d = self.opts.domain
        alice.send_message(mto=bob.boundjid.full, mbody=UNICODE_TEXT, mtype="chat")
        await expect_message(bob, "alice@" + d, UNICODE_TEXT)

    async def unicode_reply(self):
        alice, bob = self.need("alice", "bob")
        d = self.opts.domain
        bob.send_message(mto=alice.boundjid.full, mbody=UNICODE_REPLY, mtype="chat")
        await expect_message(alice, "bob@" + d, UNICODE_REPLY)

    async def carol_direct_tls_ping(self):
        c = self.new_client("carol", "interop", "SCRAM-SHA-1", direct_tls=True)
        await c.login()
        if c.alpn not in (None, "xmpp-client"):
            raise CheckFailed("unexpected ALPN protocol %r" % c.alpn)
        if any(m.endswith("-PLUS") for m in c.offered_mechs):
            raise CheckFailed("channel-binding mechanisms offered: %s" % sorted(c.offered_mechs))
        rtt = await c["xep_0199"].ping(jid=self.opts.domain, timeout=self.opts.timeout)
        if rtt is None:
            raise CheckFailed("no ping answer")

    async def ping_server(self):
        (alice,) = self.need("alice")
        await alice["xep_0199"].ping(jid=self.opts.domain, timeout=self.opts.timeout)

    # --- raw wire checks

    async def no_plus_mechanisms(self):
        results = []
        for direct in (False, True):
            raw = RawStream(self.opts)
            try:
                if direct:
                    await raw.open(direct_tls=True)
                    alpn = raw.ssl_object().selected_alpn_protocol()
                    if alpn not in (None, "xmpp-client"):
                        raise CheckFailed("direct TLS: ALPN %r" % alpn)
                    await raw.stream_header()
                    feats = await raw.features()
                else:
                    feats = await raw.open_secure()
            finally:
                raw.close()
            mechs = mechanisms_of(feats)
            where = "direct TLS" if direct else "STARTTLS"
            if not mechs:
                raise CheckFailed("%s: no SASL mechanisms offered: %s" % (where, feats))
            plus = [m for m in mechs if m.upper().endswith("-PLUS")]
            if plus:
                raise CheckFailed("%s: offered %s (all: %s)" % (where, plus, mechs))
            for want in ("SCRAM-SHA-1", "PLAIN"):
                if want not in mechs:
                    raise CheckFailed("%s: %s not offered (offered: %s)" % (where, want, mechs))
            results.append("%s: %s" % (where, " ".join(mechs)))
        self.note("offered mechanisms — " + "; ".join(results))

    async def restricted_xml(self):
        raw = RawStream(self.opts)
        try:
            # STARTTLS, then the post-TLS stream header (features answered),
            # then a DTD: RFC 6120 §11.1 forbids it.
            await raw.open_secure()
            raw.buf = b""
            await raw.send("<!DOCTYPE foo>")
            data = await self.read_answer(raw, "a DTD")
        finally:
            raw.close()
        text = data.decode("utf-8", "replace")
        if "restricted-xml" not in text:
            raise CheckFailed("no <restricted-xml/> stream error; got %r" % text[-600:])

    async def policy_violation(self):
        raw = RawStream(self.opts)
        try:
            await raw.login("bob")
            raw.buf = b""
            body = "A" * BIG_STANZA_BYTES
            stanza = (
                "<message to='alice@%s' type='chat' id='big1'><body>%s</body></message>"
                % (self.opts.domain, body)
            )
            # Read while writing: the proxy may answer and close before it has
            # read the whole stanza, or stop reading it (backpressure).
            async def send():
                try:
                    await raw.send(stanza)
                except (ConnectionError, ssl.SSLError, OSError):
                    pass

            sender = asyncio.ensure_future(send())
            try:
                data = await self.read_answer(raw, "a 300 KiB stanza")
            finally:
                sender.cancel()
        finally:
            raw.close()
        text = data.decode("utf-8", "replace")
        if "policy-violation" not in text:
            raise CheckFailed("no <policy-violation/> stream error; got %r" % text[-600:])

    async def read_answer(self, raw, what):
        """What the server sends until it closes the stream, bounded: a server
        that silently accepts the input fails the check instead of hanging it."""
        wait = max(2.0, self.opts.timeout / 2)
        try:
            return await asyncio.wait_for(raw.read_all(), wait)
        except asyncio.TimeoutError:
            raise CheckFailed(
                "stream still open %gs after %s, no stream error; got %r"
                % (wait, what, raw.buf[-300:].decode("utf-8", "replace"))
            )

    async def fresh_login(self):
        c = self.new_client("alice", "fresh", "SCRAM-SHA-1")
        try:
            await c.login()
            await c.roster_contains("bob@%s" % self.opts.domain)
            await c["xep_0199"].ping(jid=self.opts.domain, timeout=self.opts.timeout)
        finally:
            await c.close()

    def note(self, text):
        print("     %s" % text, flush=True)

    async def run(self):
        o = self.opts
        await self.check("alice-scram-sha-1-login-roster-presence", self.alice_scram_login)
        await self.check("bob-plain-login-roster-presence", self.bob_plain_login)
        await self.check("mutual-presence", self.mutual_presence)
        await self.check("utf8-message-alice-to-bob", self.unicode_message)
        await self.check("utf8-reply-bob-to-alice", self.unicode_reply)
        await self.check("ping-server", self.ping_server)
        if not o.no_tls:
            if o.direct_tls_port:
                await self.check("carol-direct-tls-login-ping", self.carol_direct_tls_ping)
                await self.check("no-plus-mechanisms", self.no_plus_mechanisms)
            await self.check("restricted-xml-doctype", self.restricted_xml)
            await self.check("policy-violation-300kib-stanza", self.policy_violation)
        elif o.raw_checks:
            # development aid: exercise the raw client code against a plain node
            await self.check("raw-restricted-xml-doctype", self.restricted_xml)
            await self.check("raw-policy-violation-300kib-stanza", self.policy_violation)
        await self.check("fresh-alice-login-still-works", self.fresh_login)
        for c in self.cleanup:
            await c.close()
        if not o.no_summary:
            print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return self.failed == 0 and self.passed > 0


async def wait_ready(opts):
    """Poll until a client would be offered SASL mechanisms (the proxy learns them
    from the nodes); bounded by opts.wait_ready seconds."""
    deadline = time.monotonic() + opts.wait_ready
    last = None
    while time.monotonic() < deadline:
        raw = RawStream(opts)
        try:
            feats = await asyncio.wait_for(raw.open_secure(), 5)
            if mechanisms_of(feats):
                return True
            last = "no mechanisms in %s" % feats
        except Exception as e:
            last = "%s: %s" % (type(e).__name__, e)
        finally:
            raw.close()
        await asyncio.sleep(0.5)
    print("not ready after %gs: %s" % (opts.wait_ready, last), file=sys.stderr, flush=True)
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="STARTTLS (or, with --no-tls, plain) c2s port")
    p.add_argument("--direct-tls-port", type=int, default=0, help="XEP-0368 direct TLS port")
    p.add_argument("--domain", default="example.com")
    p.add_argument("--timeout", type=float, default=20.0, help="per-check timeout, seconds")
    p.add_argument(
        "--no-tls",
        action="store_true",
        help="baseline mode: plain TCP straight to a node, proxy-only checks skipped",
    )
    p.add_argument(
        "--wait-ready",
        type=float,
        metavar="SECONDS",
        help="only wait until the server offers SASL mechanisms after STARTTLS, then exit",
    )
    p.add_argument("--ca", help="CA certificate (PEM) to verify the server certificate with")
    p.add_argument("--no-summary", action="store_true", help="omit the final summary line")
    p.add_argument("--raw-checks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="slixmpp debug log to stderr")
    opts = p.parse_args()
    global CA_FILE
    CA_FILE = opts.ca
    logging.basicConfig(
        level=logging.DEBUG if opts.verbose else logging.CRITICAL,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if opts.wait_ready is not None:
        ok = loop.run_until_complete(wait_ready(opts))
    else:
        ok = loop.run_until_complete(Suite(opts).run())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
