//! PROXY protocol version 2 (HAProxy's binary header) towards nodes.
//!
//! With `proxy_protocol = true` on a `[[nodes]]` entry, every connection the
//! proxy opens to that node starts with a v2 header: a `PROXY` command with
//! the client's address and port as the source (and the node's address as
//! the destination) for a relayed login, and the proxy's own address for
//! its heartbeats and probes (a `LOCAL` command would fit them better, but
//! ejabberd 23.01 never answers a stream that follows one). The node then
//! logs, limits and audits by the real client address instead of the
//! proxy's.
//!
//! [`read_header`] is the receiving side, for the simulated node and tests.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{self, Addresses, Builder, Command, Protocol, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes before the variable part of a v2 header (signature, version and
/// command, family and protocol, length).
const FIXED: usize = 16;

/// The v2 header for a connection to `node`: `PROXY` from `client`, or
/// `LOCAL` (no address) when the connection is the proxy's own.
pub fn header(client: Option<SocketAddr>, node: SocketAddr) -> Vec<u8> {
    let built = match client {
        Some(client) => {
            let (src, dst) = same_family(client, node);
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
                .build()
        }
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
        )
        .build(),
    };
    // Building into a Vec cannot fail; fall back to the fixed LOCAL header.
    built.unwrap_or_else(|_| {
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        h
    })
}

/// Both addresses in one family: an IPv4 one is written as IPv4-mapped
/// IPv6 when the other is IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

/// What a received header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// `PROXY` from this source address.
    Proxy(SocketAddr),
    /// `LOCAL` (or `PROXY` with no internet address): the peer's own
    /// connection.
    Local,
}

/// Reads one v2 header from `r` (exactly its bytes, nothing after it),
/// within `timeout`. Anything that is not a v2 header is an
/// `InvalidData` error.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> io::Result<Received> {
    tokio::time::timeout(timeout, read_inner(r))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))?
}

async fn read_inner<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Received> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = vec![0u8; FIXED];
    r.read_exact(&mut buf).await?;
    if !buf.starts_with(v2::PROTOCOL_PREFIX) {
        return Err(bad("not a PROXY protocol v2 header".into()));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    buf.resize(FIXED + len, 0);
    r.read_exact(&mut buf[FIXED..]).await?;
    let h = v2::Header::try_from(&buf[..]).map_err(|e| bad(e.to_string()))?;
    if h.command == Command::Local {
        return Ok(Received::Local);
    }
    Ok(match h.addresses {
        Addresses::IPv4(a) => {
            Received::Proxy(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        Addresses::IPv6(a) => {
            let ip = a.source_address;
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            Received::Proxy(SocketAddr::new(ip, a.source_port))
        }
        _ => Received::Local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip() {
        let node: SocketAddr = "192.0.2.10:5222".parse().unwrap();
        for client in ["198.51.100.7:40000", "[2001:db8::1]:40001"] {
            let client: SocketAddr = client.parse().unwrap();
            let mut bytes = header(Some(client), node);
            bytes.extend_from_slice(b"<stream>");
            let mut r = &bytes[..];
            let got = read_header(&mut r, Duration::from_secs(1)).await.unwrap();
            assert_eq!(got, Received::Proxy(client));
            assert_eq!(r, b"<stream>", "reads exactly the header");
        }
        let bytes = header(None, node);
        let mut r = &bytes[..];
        assert_eq!(
            read_header(&mut r, Duration::from_secs(1)).await.unwrap(),
            Received::Local
        );
        let mut r = &b"<?xml version='1.0'?><stream:stream>"[..];
        let e = read_header(&mut r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
