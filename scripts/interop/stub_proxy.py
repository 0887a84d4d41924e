#!/usr/bin/python3
"""A crude stand-in for prg-proxy, to check the interop suite's proxy mode
(orchestration, config, TLS client paths) while the real proxy is not there:

    PRG_PROXY_BIN=scripts/interop/stub_proxy.py bash scripts/interop.sh

It accepts `run --config FILE` with prg-proxy's config, terminates STARTTLS and
direct TLS (ALPN xmpp-client) with [tls] cert/key, serves the pre-auth stream
itself (SASL mechanisms learned from the first node, -PLUS removed), forwards
the first <auth> to the first node over plain TCP and then relays bytes. The
restricted-XML and size checks are naive pattern matches. It is NOT the product
and proves nothing about prg-proxy; it only shows the suite's own plumbing works.
"""

import asyncio
import re
import ssl
import sys
import tomllib

STREAM_NS = "http://etherx.jabber.org/streams"
MAX_STANZA = 256 * 1024
HEADER_RX = re.compile(rb"<stream:stream[^>]*>")
AUTH_RX = re.compile(rb"<auth[^>]*/>|<auth.*?</auth>", re.S)
STANZA_END_RX = re.compile(rb"</(?:message|iq|presence)>|<(?:message|iq|presence)[^>]*/>")


def split_addr(a):
    host, port = a.rsplit(":", 1)
    return host, int(port)


class Stub:
    def __init__(self, cfg):
        self.cfg = cfg
        self.node = split_addr(cfg["nodes"][0]["address"])
        self.domain = cfg["group"]["domains"][0]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cfg["tls"]["cert"], cfg["tls"]["key"])
        self.ctx.set_alpn_protocols(["xmpp-client"])
        self.mechs = []

    def header(self):
        return (
            "<?xml version='1.0'?><stream:stream from='%s' id='stub' version='1.0' "
            "xmlns='jabber:client' xmlns:stream='%s'>" % (self.domain, STREAM_NS)
        ).encode()

    async def learn_mechanisms(self):
        r, w = await asyncio.open_connection(*self.node)
        w.write(
            (
                "<?xml version='1.0'?><stream:stream to='%s' version='1.0' "
                "xmlns='jabber:client' xmlns:stream='%s'>" % (self.domain, STREAM_NS)
            ).encode()
        )
        buf = b""
        while b"</stream:features>" not in buf:
            chunk = await r.read(4096)
            if not chunk:
                break
            buf += chunk
        w.close()
        mechs = re.findall(rb"<mechanism>([^<]+)</mechanism>", buf)
        self.mechs = [m.decode() for m in mechs if not m.endswith(b"-PLUS")]

    async def read_until(self, r, buf, rx):
        while True:
            m = rx.search(buf)
            if m:
                return m, buf
            chunk = await r.read(65536)
            if not chunk:
                raise ConnectionError("client closed")
            buf += chunk

    async def stream_error(self, w, cond):
        w.write(
            (
                "<stream:error><%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                "</stream:error></stream:stream>" % cond
            ).encode()
        )
        await w.drain()
        w.close()

    async def client(self, r, w, direct):
        try:
            buf = b""
            if not direct:
                m, buf = await self.read_until(r, buf, HEADER_RX)
                w.write(
                    self.header()
                    + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                    b"<required/></starttls></stream:features>"
                )
                m, buf = await self.read_until(r, buf, re.compile(rb"<starttls[^>]*>"))
                w.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                await w.drain()
                await w.start_tls(self.ctx)
                buf = b""
            m, buf = await self.read_until(r, buf, HEADER_RX)
            buf = buf[m.end():]
            mechs = "".join("<mechanism>%s</mechanism>" % x for x in self.mechs)
            w.write(
                self.header()
                + (
                    "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                    "%s</mechanisms></stream:features>" % mechs
                ).encode()
            )
            while True:
                if b"<!DOCTYPE" in buf or b"<!--" in buf:
                    return await self.stream_error(w, "restricted-xml")
                m = AUTH_RX.search(buf)
                if m:
                    break
                chunk = await r.read(65536)
                if not chunk:
                    return
                buf += chunk
            nr, nw = await asyncio.open_connection(*self.node)
            nw.write(
                (
                    "<?xml version='1.0'?><stream:stream to='%s' version='1.0' "
                    "xmlns='jabber:client' xmlns:stream='%s'>" % (self.domain, STREAM_NS)
                ).encode()
            )
            nbuf = b""
            while b"</stream:features>" not in nbuf:
                chunk = await nr.read(4096)
                if not chunk:
                    return
                nbuf += chunk
            nw.write(buf)
            await asyncio.gather(self.pump_up(r, nw, w), self.pump(nr, w))
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            w.close()

    async def pump(self, r, w):
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            w.write(chunk)
            await w.drain()
        w.close()

    async def pump_up(self, r, nw, cw):
        pending = 0
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            if b"<!DOCTYPE" in chunk:
                nw.close()
                return await self.stream_error(cw, "restricted-xml")
            ends = list(STANZA_END_RX.finditer(chunk))
            if ends and pending + ends[0].end() > MAX_STANZA:
                pending = MAX_STANZA + 1  # the stanza that just ended was too big
            else:
                pending = len(chunk) - ends[-1].end() if ends else pending + len(chunk)
            if pending > MAX_STANZA:
                nw.close()
                return await self.stream_error(cw, "policy-violation")
            nw.write(chunk)
            await nw.drain()
        nw.close()

    async def main(self):
        await self.learn_mechanisms()
        s1 = await asyncio.start_server(
            lambda r, w: self.client(r, w, False), *split_addr(self.cfg["listen"]["starttls"])
        )
        s2 = await asyncio.start_server(
            lambda r, w: self.client(r, w, True),
            *split_addr(self.cfg["listen"]["direct_tls"]),
            ssl=self.ctx,
        )
        print("stub proxy listening; node %s:%d; mechanisms %s" % (*self.node, self.mechs), file=sys.stderr)
        async with s1, s2:
            await asyncio.gather(s1.serve_forever(), s2.serve_forever())


def main():
    args = sys.argv[1:]
    if len(args) != 3 or args[0] != "run" or args[1] != "--config":
        sys.exit("usage: stub_proxy.py run --config FILE")
    with open(args[2], "rb") as f:
        cfg = tomllib.load(f)
    asyncio.run(Stub(cfg).main())


if __name__ == "__main__":
    main()
