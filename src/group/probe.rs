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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::Instant;

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
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_millis(100);
        let err = http_get_2xx(&format!("{addr}/health"), t)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(d) if d == t), "{err}");
        drop(listener);
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
