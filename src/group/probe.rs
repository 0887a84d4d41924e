//! Health probes of one node: the I/O half that feeds the state machine.
//!
//! Each probe is one async function bounded by the `timeout` it is given (the
//! whole exchange, connect included), and returns a typed [`ProbeError`] so that
//! the driver can tell "refused" (the host is up, the service is not) from
//! "timed out" (host or network gone) before it reports
//! [`Event::ConnectionsLost`](super::Event::ConnectionsLost).

use std::future::Future;
use std::io;
use std::time::Duration;

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::Instant;

/// Bound on what the node may send before its stream features end: a real
/// features element is a few hundred bytes.
const MAX_FEATURES_BYTES: usize = 64 * 1024;

/// Bound on an HTTP status line and headers we read before giving up.
const MAX_HTTP_HEAD_BYTES: usize = 16 * 1024;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The whole probe took longer than its timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection could not be opened.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// Reading or writing failed after connecting.
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
    /// The node closed the connection before answering completely.
    #[error("the node closed the connection early")]
    Closed,
    /// The answer is not what the protocol says.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The answer did not end within the size bound.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    /// The XMPP node answered with a stream error (its condition element name).
    #[error("stream error from the node: {0}")]
    StreamError(String),
    /// The HTTP endpoint answered with a status other than 2xx.
    #[error("HTTP status {0}")]
    Status(u16),
}

impl ProbeError {
    /// The host answered but nothing listens on the port: strong evidence that
    /// the service is down (as opposed to a timeout, which may be the network).
    pub fn is_refused(&self) -> bool {
        matches!(self, ProbeError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

async fn connect(addr: impl ToSocketAddrs) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    // Probes write small requests and wait for the answer: do not delay them.
    stream.set_nodelay(true).map_err(ProbeError::Io)?;
    Ok(stream)
}

/// Opens (and drops) a TCP connection; returns how long the connect took.
pub async fn tcp_connect(
    addr: impl ToSocketAddrs,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    bounded(timeout, async {
        let start = Instant::now();
        connect(addr).await?;
        Ok(start.elapsed())
    })
    .await
}

/// Opens a plain-TCP XMPP client stream to the node for `domain`, reads its
/// `<stream:features>` and closes the stream politely. Returns the SASL
/// mechanisms offered (empty if the node offers none before STARTTLS).
pub async fn xmpp_stream(
    addr: impl ToSocketAddrs,
    domain: &str,
    timeout: Duration,
) -> Result<Vec<String>, ProbeError> {
    bounded(timeout, async {
        let mut stream = connect(addr).await?;
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{}' version='1.0' \
             xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
            escape_attr(domain)
        );
        stream
            .write_all(header.as_bytes())
            .await
            .map_err(ProbeError::Io)?;
        let mut buf = Vec::with_capacity(1024);
        let mechanisms = loop {
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk).await.map_err(ProbeError::Io)?;
            if n == 0 {
                // Judge what arrived; an incomplete answer is "closed early".
                return match parse_features(&buf) {
                    Features::Done(m) => Ok(m),
                    Features::StreamError(c) => Err(ProbeError::StreamError(c)),
                    Features::Incomplete => Err(ProbeError::Closed),
                };
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_features(&buf) {
                Features::Done(m) => break m,
                Features::StreamError(c) => return Err(ProbeError::StreamError(c)),
                Features::Incomplete if buf.len() > MAX_FEATURES_BYTES => {
                    return Err(ProbeError::TooLarge(MAX_FEATURES_BYTES))
                }
                Features::Incomplete => {}
            }
        };
        // Close politely; the node's answer does not matter any more.
        let _ = stream.write_all(b"</stream:stream>").await;
        let _ = stream.shutdown().await;
        Ok(mechanisms)
    })
    .await
}

/// What the bytes received so far say.
#[derive(Debug, PartialEq, Eq)]
enum Features {
    /// The features element ended; the SASL mechanisms in it.
    Done(Vec<String>),
    /// The node sent a stream error (the condition's element name).
    StreamError(String),
    /// More bytes are needed (a truncated document is not an error yet).
    Incomplete,
}

/// Parses the node's stream header and features from the start of `buf`.
fn parse_features(buf: &[u8]) -> Features {
    let mut reader = Reader::from_reader(buf);
    let mut depth = 0usize;
    let mut in_mechanisms = false;
    let mut in_mechanism = false;
    let mut in_error = false;
    let mut mechanisms = Vec::new();
    loop {
        let event = match reader.read_event() {
            Ok(e) => e,
            // A truncated tag or text reads as an error; wait for more bytes.
            Err(_) => return Features::Incomplete,
        };
        match event {
            XmlEvent::Start(e) => {
                depth += 1;
                let name = e.local_name();
                let name = name.as_ref();
                if depth == 2 && name == b"error" {
                    in_error = true;
                } else if in_error && depth == 3 {
                    return Features::StreamError(String::from_utf8_lossy(name).into_owned());
                } else if depth == 3 && name == b"mechanisms" {
                    in_mechanisms = true;
                } else if in_mechanisms && depth == 4 && name == b"mechanism" {
                    in_mechanism = true;
                }
            }
            XmlEvent::Empty(e) => {
                let name = e.local_name();
                let name = name.as_ref();
                if in_error && depth == 2 {
                    return Features::StreamError(String::from_utf8_lossy(name).into_owned());
                }
                if depth == 1 && name == b"features" {
                    return Features::Done(mechanisms);
                }
            }
            XmlEvent::Text(t) if in_mechanism => match t.unescape() {
                Ok(text) => mechanisms.push(text.trim().to_owned()),
                Err(_) => return Features::Incomplete,
            },
            XmlEvent::End(e) => {
                let name = e.local_name();
                let name = name.as_ref();
                if depth == 4 && in_mechanism {
                    in_mechanism = false;
                } else if depth == 3 && in_mechanisms {
                    in_mechanisms = false;
                } else if depth == 2 && name == b"features" {
                    return Features::Done(mechanisms);
                } else if depth == 2 && in_error {
                    return Features::StreamError("undefined-condition".into());
                }
                depth = depth.saturating_sub(1);
            }
            XmlEvent::Eof => return Features::Incomplete,
            _ => {}
        }
    }
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `GET`s `target` (`host:port/path`, e.g. `imp1.example.com:8080/health`) over
/// plain HTTP/1.1 and expects a 2xx status; returns the status.
pub async fn http_get_2xx(target: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let (authority, path) = match target.find('/') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, "/"),
    };
    if authority.is_empty() || path.contains(['\r', '\n', ' ']) {
        return Err(ProbeError::Malformed(format!(
            "bad probe target {target:?}"
        )));
    }
    bounded(timeout, async {
        let mut stream = connect(authority).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: prg-proxy\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Io)?;
        let mut buf = Vec::with_capacity(512);
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                let status = parse_status_line(&buf[..end])?;
                let _ = stream.shutdown().await;
                return if (200..300).contains(&status) {
                    Ok(status)
                } else {
                    Err(ProbeError::Status(status))
                };
            }
            if buf.len() > MAX_HTTP_HEAD_BYTES {
                return Err(ProbeError::TooLarge(MAX_HTTP_HEAD_BYTES));
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.map_err(ProbeError::Io)?;
            if n == 0 {
                return Err(ProbeError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let malformed = || ProbeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let line = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(malformed());
    }
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 {
        return Err(malformed());
    }
    code.parse().map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    /// A one-connection server on a loopback port: reads the request, answers
    /// `reply` (in two halves, to exercise reassembly) and returns everything it
    /// read until the client closed.
    async fn serve_once(reply: &'static [u8]) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; 4096];
            let n = sock.read(&mut got).await.unwrap();
            got.truncate(n);
            let (a, b) = reply.split_at(reply.len() / 2);
            sock.write_all(a).await.unwrap();
            sock.flush().await.unwrap();
            tokio::task::yield_now().await;
            sock.write_all(b).await.unwrap();
            // Read whatever comes next (the polite close) until EOF.
            let mut rest = Vec::new();
            let _ = sock.read_to_end(&mut rest).await;
            got.extend_from_slice(&rest);
            got
        });
        (addr, task)
    }

    const FEATURES: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' from='example.com' id='x' version='1.0'>\
        <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\
        <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>\
        <mechanism>PLAIN</mechanism></mechanisms></stream:features>";

    #[tokio::test]
    async fn tcp_connect_ok_and_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(tcp_connect(addr, T).await.is_ok());
        drop(listener);
        let err = tcp_connect(addr, T).await.unwrap_err();
        assert!(err.is_refused(), "{err}");
    }

    #[tokio::test]
    async fn xmpp_stream_reads_mechanisms_and_closes() {
        let (addr, server) = serve_once(FEATURES).await;
        let mechs = xmpp_stream(addr.as_str(), "example.com", T).await.unwrap();
        assert_eq!(mechs, ["SCRAM-SHA-1", "PLAIN"]);
        let sent = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(sent.contains("to='example.com'"), "{sent}");
        assert!(sent.ends_with("</stream:stream>"), "{sent}");
    }

    #[tokio::test]
    async fn xmpp_stream_error_is_typed() {
        let (addr, _server) = serve_once(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
              version='1.0'><stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              </stream:error></stream:stream>",
        )
        .await;
        let err = xmpp_stream(addr.as_str(), "nope.example", T)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::StreamError(ref c) if c == "host-unknown"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn xmpp_stream_silent_node_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_millis(100);
        let err = xmpp_stream(addr, "example.com", t).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(d) if d == t), "{err}");
        drop(listener);
    }

    #[test]
    fn features_every_prefix_is_incomplete_then_done() {
        for end in 0..FEATURES.len() {
            let got = parse_features(&FEATURES[..end]);
            assert_eq!(got, Features::Incomplete, "prefix {end}");
        }
        assert_eq!(
            parse_features(FEATURES),
            Features::Done(vec!["SCRAM-SHA-1".into(), "PLAIN".into()])
        );
        let empty = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>\
            <stream:features/>";
        assert_eq!(parse_features(empty), Features::Done(vec![]));
    }

    #[tokio::test]
    async fn http_2xx_and_other_statuses() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
        let target = format!("{addr}/health");
        assert_eq!(http_get_2xx(&target, T).await.unwrap(), 204);
        let sent = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(sent.starts_with("GET /health HTTP/1.1\r\nHost: "), "{sent}");

        let (addr, _server) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = http_get_2xx(&addr, T).await.unwrap_err();
        assert!(matches!(err, ProbeError::Status(503)), "{err}");

        let (addr, _server) = serve_once(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let err = http_get_2xx(&addr, T).await.unwrap_err();
        assert!(matches!(err, ProbeError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn http_bad_target_refused_before_connecting() {
        let err = http_get_2xx("/health", T).await.unwrap_err();
        assert!(matches!(err, ProbeError::Malformed(_)), "{err}");
    }
}
