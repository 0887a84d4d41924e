#!/usr/bin/env python3
"""PROXY protocol check against a real server: logs a slixmpp client in
through prg-proxy (which sends a PROXY v2 header to the node) and prints the
client's own address, which the node must have logged as the source.

Prints `client ADDR:PORT` on success; exits 1 on failure."""

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402
import slixmpp  # noqa: E402


class Login(slixmpp.ClientXMPP):
    def __init__(self, user, domain):
        super().__init__("%s@%s/desk" % (user, domain), clients.PASSWORD)
        self.auto_reconnect = False
        self.ssl_context = clients.client_tls_context()
        self.started = asyncio.Event()
        self.add_event_handler("session_start", lambda _e: self.started.set())


async def run(opts):
    c = Login(opts.user, opts.domain)
    c.connect((opts.host, opts.port), use_ssl=False, force_starttls=True, disable_starttls=False)
    try:
        await asyncio.wait_for(c.started.wait(), opts.timeout)
    except asyncio.TimeoutError:
        print("no session through the proxy", file=sys.stderr)
        return 1
    host, port = c.transport.get_extra_info("sockname")[:2]
    print("client %s:%d" % (host, port), flush=True)
    c.disconnect()
    await asyncio.sleep(0.2)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", default="example.com")
    p.add_argument("--user", default="alice")
    p.add_argument("--ca")
    p.add_argument("--timeout", type=float, default=20)
    opts = p.parse_args()
    clients.CA_FILE = opts.ca
    sys.exit(asyncio.run(run(opts)))


if __name__ == "__main__":
    main()
