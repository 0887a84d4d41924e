//! The relay phase: both directions of one session in one task.
//!
//! One loop drives the four halves (client read, node write, node read,
//! client write), the control point and the shutdown signal with
//! `tokio::select!`. What makes it safe to cancel any branch at any time:
//!
//! - reads go into the direction's buffer (`read_buf` is cancel safe);
//! - only *complete* frames leave a buffer, split off into the other side's
//!   out queue, and injected bytes are queued after them, so everything
//!   queued is whole stanzas;
//! - writes take bytes off the queue only once `write` returned how many it
//!   took (`write` is cancel safe: a cancelled write wrote nothing).
//!
//! So control messages are handled while a write is pending, and nothing is
//! ever left half-written because another branch won. Every write batch has
//! a deadline (`limits.write_timeout`): a peer that does not take its bytes
//! in time is disconnected. Once the relay decides to end (eviction,
//! shutdown, either side closing or failing) it stops reading, finishes the
//! queued whole stanzas and the closing bytes on both sides, and closes the
//! client, all within one more write deadline.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::hooks::{Hooks, Injections};
use super::{wait_shutdown, ConnError, End, Side};
use crate::control::{Control, ControlReceiver, DoneToken};
use crate::metrics::Metrics;
use crate::upstream::BoxStream;
use crate::xmpp::framer::{FrameError, FrameKind, Framer};
use crate::xmpp::stream;

const CLOSE_STREAM: &[u8] = b"</stream:stream>";

/// What the relay needs besides the two streams.
pub(super) struct RelayParams<'a> {
    pub(super) metrics: &'a Metrics,
    /// The stream error that ends the client stream for a reason the
    /// relay noticed itself (each carries a re-login hint).
    pub(super) closing: &'a (dyn Fn(Closing) -> String + Send + Sync),
    pub(super) read_size: usize,
    pub(super) write_timeout: Duration,
    pub(super) close_wait: Duration,
}

/// Why the relay itself ends a client stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closing {
    /// The connection to the node was lost.
    NodeLost,
    /// The node stopped reading.
    NodeStalled,
    /// The proxy is shutting down.
    Shutdown,
}

/// One direction's queue of whole stanzas waiting to be written, with the
/// deadline of the batch being written.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Bytes>,
    /// Bytes were written that may still sit in a TLS buffer.
    flush: bool,
    /// Close the writer once everything is written and flushed.
    shut: bool,
    shut_done: bool,
    deadline: Option<Instant>,
}

impl Outbox {
    fn pending(&self) -> bool {
        !self.queue.is_empty() || self.flush || (self.shut && !self.shut_done)
    }

    /// Asks for the writer to be closed after the queue.
    fn shut_after(&mut self, timeout: Duration) {
        if !self.pending() {
            self.deadline = Some(Instant::now() + timeout);
        }
        self.shut = true;
    }

    /// Gives up on what is queued (the peer is gone or does not read).
    fn abandon(&mut self) {
        self.queue.clear();
        self.flush = false;
        self.shut_done = true;
        self.deadline = None;
    }

    fn push(&mut self, b: Bytes, timeout: Duration) {
        if b.is_empty() {
            return;
        }
        if !self.pending() {
            self.deadline = Some(Instant::now() + timeout);
        }
        self.queue.push_back(b);
    }

    /// Writes some of the front chunk, or flushes when all is written.
    /// Cancel safe: the queue changes only after `write` returned.
    async fn drive<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        if let Some(front) = self.queue.front_mut() {
            let n = w.write(front).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            front.advance(n);
            if front.is_empty() {
                self.queue.pop_front();
            }
            self.flush = true;
        } else if self.flush {
            w.flush().await?;
            self.flush = false;
            if !self.shut {
                self.deadline = None;
            }
        } else if self.shut && !self.shut_done {
            let r = w.shutdown().await;
            self.shut_done = true;
            self.deadline = None;
            r?;
        }
        Ok(())
    }
}

/// What one scan of a read buffer found.
struct Batch {
    ready: usize,
    stanzas: u64,
    closed: bool,
    /// Scanning stopped at the stanza after `ready` (of this length),
    /// which the caller handles itself.
    stopped: Option<usize>,
}

/// Frames everything complete in `buf`, calling `observe` for each stanza
/// (which returns `false` to stop before that stanza). On error, returns
/// the bytes ready before it and the error.
fn scan(
    framer: &mut Framer,
    buf: &[u8],
    mut observe: impl FnMut(&[u8], &crate::xmpp::framer::Frame) -> bool,
) -> Result<Batch, (usize, FrameError)> {
    let mut b = Batch {
        ready: 0,
        stanzas: 0,
        closed: false,
        stopped: None,
    };
    loop {
        match framer.next(&buf[b.ready..]) {
            Ok(Some(f)) => {
                if f.kind == FrameKind::Stanza {
                    if !observe(&buf[b.ready..b.ready + f.len], &f) {
                        b.stopped = Some(f.len);
                        return Ok(b);
                    }
                    b.stanzas += 1;
                }
                b.ready += f.len;
                if f.kind == FrameKind::Close {
                    b.closed = true;
                    return Ok(b);
                }
            }
            Ok(None) => return Ok(b),
            Err(e) => return Err((b.ready, e)),
        }
    }
}

/// Where the relay is in its life.
enum Phase {
    /// Relaying both ways.
    Open,
    /// The client closed its stream; the node may still answer until the
    /// deadline.
    ClientClosed { until: Instant },
    /// Finishing the queues and closing, by the deadline.
    Closing { until: Instant },
}

/// Relays until an end; `buffers` hold bytes already read from each side.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    client: BoxStream,
    mut client_buf: BytesMut,
    mut client_framer: Framer,
    node: BoxStream,
    mut node_buf: BytesMut,
    mut node_framer: Framer,
    mut hooks: Hooks,
    control: ControlReceiver,
    shutdown: watch::Receiver<bool>,
    p: RelayParams<'_>,
) -> End {
    // One future for the control point and the shutdown signal, kept
    // across turns of the loop (made anew only after it fired), so that a
    // turn does not register and unregister two waiters.
    let mut signal = std::pin::pin!(next_signal(control, shutdown));
    // Idle sessions hold no read buffer (see `read_into`).
    release_if_drained(&mut client_buf);
    release_if_drained(&mut node_buf);
    let (mut cr, mut cw): (ReadHalf<BoxStream>, WriteHalf<BoxStream>) = tokio::io::split(client);
    let (mut nr, mut nw) = tokio::io::split(node);
    let mut to_node = Outbox::default();
    let mut to_client = Outbox::default();
    let mut phase = Phase::Open;
    // The end decided so far (the first reason wins).
    let mut end: Option<End> = None;
    // Held until the relay returns: the evictor learns the stream is closed.
    let mut evict_token: Option<DoneToken> = None;
    let mut client_reading = true;
    let mut node_reading = true;
    let wt = p.write_timeout;

    // Begins closing: stop reading, queue the closing bytes.
    macro_rules! close {
        ($end:expr, to_client: $c:expr, to_node: $n:expr) => {{
            if end.is_none() {
                end = Some($end);
            }
            if !matches!(phase, Phase::Closing { .. }) {
                if let Some(b) = $c {
                    to_client.push(b, wt);
                }
                if let Some(b) = $n {
                    to_node.push(b, wt);
                }
                to_client.shut_after(wt);
                phase = Phase::Closing {
                    until: Instant::now() + wt,
                };
            }
            client_reading = false;
            node_reading = false;
        }};
    }

    loop {
        // Frame what has arrived (only while the other side's queue is
        // empty: one batch in flight per direction is the backpressure).
        if client_reading && !to_node.pending() && !client_buf.is_empty() {
            let mut inj = Injections::default();
            match scan(&mut client_framer, &client_buf, |frame, f| {
                // TLS is the proxy's: a second <starttls/> is its to answer.
                if f.name(frame) == b"starttls" {
                    return false;
                }
                hooks.client_stanza(frame, f, &mut inj);
                true
            }) {
                Ok(b) => {
                    if b.ready > 0 {
                        p.metrics
                            .bytes_up
                            .fetch_add(b.ready as u64, Ordering::Relaxed);
                        p.metrics.stanzas_up.fetch_add(b.stanzas, Ordering::Relaxed);
                        to_node.push(client_buf.split_to(b.ready).freeze(), wt);
                        release_if_drained(&mut client_buf);
                    }
                    if b.stopped.is_some() {
                        queue_injections(inj, &mut to_client, &mut to_node, wt);
                        close!(
                            End::Error(ConnError::Protocol(Side::Client, "<starttls/> on an encrypted stream".into())),
                            to_client: Some(Bytes::from_static(stream::TLS_FAILURE_CLOSE.as_bytes())),
                            to_node: Some(Bytes::from_static(CLOSE_STREAM))
                        );
                        continue;
                    }
                    queue_injections(inj, &mut to_client, &mut to_node, wt);
                    if b.closed {
                        client_reading = false;
                        if matches!(phase, Phase::Open) {
                            phase = Phase::ClientClosed {
                                until: Instant::now() + p.close_wait,
                            };
                            end = Some(End::ClientClosed);
                        }
                    }
                }
                Err((ready, e)) => {
                    to_node.push(client_buf.split_to(ready).freeze(), wt);
                    let xml = stream::frame_error(&e);
                    close!(
                        End::Error(ConnError::ClientXml(e)),
                        to_client: Some(Bytes::from(xml)),
                        to_node: Some(Bytes::from_static(CLOSE_STREAM))
                    );
                }
            }
        }
        if node_reading && !to_client.pending() && !node_buf.is_empty() {
            let mut inj = Injections::default();
            let mut features: Option<Vec<u8>> = None;
            match scan(&mut node_framer, &node_buf, |frame, f| {
                // The proxy owns the client's TLS: the node's STARTTLS
                // offer is taken out of its features.
                if f.name(frame).ends_with(b"features") {
                    if let Some(rewritten) = stream::features_without_starttls(frame) {
                        features = Some(rewritten);
                        return false;
                    }
                }
                hooks.node_stanza(frame, f, &mut inj);
                inj.close.is_none()
            }) {
                Ok(b) => {
                    if b.ready > 0 {
                        p.metrics
                            .bytes_down
                            .fetch_add(b.ready as u64, Ordering::Relaxed);
                        p.metrics
                            .stanzas_down
                            .fetch_add(b.stanzas, Ordering::Relaxed);
                        to_client.push(node_buf.split_to(b.ready).freeze(), wt);
                        release_if_drained(&mut node_buf);
                    }
                    if let (Some(len), Some(rewritten)) = (b.stopped, features.take()) {
                        queue_injections(inj, &mut to_client, &mut to_node, wt);
                        node_buf.advance(len);
                        release_if_drained(&mut node_buf);
                        to_client.push(Bytes::from(rewritten), wt);
                        continue;
                    }
                    if b.stopped.is_some() {
                        let xml = inj.close.take().unwrap_or_default();
                        close!(
                            End::Error(ConnError::Protocol(Side::Node, "the node logged in another user than the one routed".into())),
                            to_client: Some(Bytes::from(xml)),
                            to_node: Some(Bytes::from_static(CLOSE_STREAM))
                        );
                        continue;
                    }
                    queue_injections(inj, &mut to_client, &mut to_node, wt);
                    if b.closed {
                        // The node's close is queued for the client.
                        close!(End::NodeClosed, to_client: None::<Bytes>, to_node: None::<Bytes>);
                    }
                }
                Err((ready, e)) => {
                    warn!(error = %e, "node sent bad XML");
                    to_client.push(node_buf.split_to(ready).freeze(), wt);
                    let xml = stream::stream_error(
                        "internal-server-error",
                        Some(&super::node_frame_error_text(&e)),
                        None,
                    );
                    close!(
                        End::Error(ConnError::NodeXml(e)),
                        to_client: Some(Bytes::from(xml)),
                        to_node: Some(Bytes::from_static(CLOSE_STREAM))
                    );
                }
            }
        }

        // Done closing?
        let deadline = match phase {
            Phase::Open => None,
            Phase::ClientClosed { until } => Some(until),
            Phase::Closing { until } => {
                if !to_node.pending() && !to_client.pending() {
                    break;
                }
                Some(until)
            }
        };
        let write_deadline = [to_node.deadline, to_client.deadline, deadline]
            .into_iter()
            .flatten()
            .min();
        let can_read_client = client_reading && !to_node.pending() && matches!(phase, Phase::Open);
        let can_read_node = node_reading && !to_client.pending();
        let closing = matches!(phase, Phase::Closing { .. });

        tokio::select! {
            biased;
            (sig, c, sh) = &mut signal, if !closing => {
                signal.set(next_signal(c, sh));
                match sig {
                    Signal::Control(Control::Evict(e)) => {
                        evict_token = e.done;
                        close!(
                            End::Evicted,
                            to_client: Some(Bytes::from(e.xml)),
                            to_node: Some(Bytes::from_static(CLOSE_STREAM))
                        );
                    }
                    Signal::Control(Control::Inject(b)) => to_client.push(b, wt),
                    Signal::Control(Control::ToNode(b)) => to_node.push(b, wt),
                    Signal::Shutdown => {
                        let xml = (p.closing)(Closing::Shutdown);
                        close!(
                            End::Shutdown,
                            to_client: Some(Bytes::from(xml)),
                            to_node: Some(Bytes::from_static(CLOSE_STREAM))
                        );
                    }
                }
            }
            r = to_client.drive(&mut cw), if to_client.pending() => {
                if let Err(e) = r {
                    if to_client.shut_done {
                        // Only the close failed: everything was written.
                        debug!(error = %e, "closing the client stream");
                        continue;
                    }
                    return finish(end, ConnError::io(Side::Client, "write", e), evict_token);
                }
            }
            r = to_node.drive(&mut nw), if to_node.pending() => {
                if let Err(e) = r {
                    // The node is gone mid-write: tell the client.
                    let xml = (p.closing)(Closing::NodeLost);
                    to_node.abandon();
                    close!(
                        End::Error(ConnError::io(Side::Node, "write", e)),
                        to_client: Some(Bytes::from(xml)),
                        to_node: None::<Bytes>
                    );
                }
            }
            r = read_into(&mut cr, &mut client_buf, p.read_size), if can_read_client => match r {
                Ok(0) => {
                    close!(
                        End::ClientClosed,
                        to_client: None::<Bytes>,
                        to_node: Some(Bytes::from_static(CLOSE_STREAM))
                    );
                }
                Ok(_) => {}
                // TLS ended without close_notify: as good as a close for XMPP,
                // whose stream has its own end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => close!(
                    End::ClientClosed,
                    to_client: None::<Bytes>,
                    to_node: Some(Bytes::from_static(CLOSE_STREAM))
                ),
                Err(e) => close!(
                    End::Error(ConnError::io(Side::Client, "read", e)),
                    to_client: None::<Bytes>,
                    to_node: Some(Bytes::from_static(CLOSE_STREAM))
                ),
            },
            r = read_into(&mut nr, &mut node_buf, p.read_size), if can_read_node => match r {
                Ok(0) | Err(_) if matches!(phase, Phase::ClientClosed { .. }) => {
                    // The client left first; the node closing is the answer.
                    close!(End::ClientClosed, to_client: None::<Bytes>, to_node: None::<Bytes>);
                }
                Ok(0) => {
                    let xml = (p.closing)(Closing::NodeLost);
                    close!(
                        End::NodeLost(ConnError::Protocol(Side::Node, "the node closed the connection".into())),
                        to_client: Some(Bytes::from(xml)),
                        to_node: None::<Bytes>
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    let xml = (p.closing)(Closing::NodeLost);
                    close!(
                        End::NodeLost(ConnError::io(Side::Node, "read", e)),
                        to_client: Some(Bytes::from(xml)),
                        to_node: None::<Bytes>
                    );
                }
            },
            () = sleep_until_opt(write_deadline) => {
                let now = Instant::now();
                let late = |d: Option<Instant>| d.is_some_and(|d| d <= now);
                if late(to_client.deadline) {
                    p.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    return finish(end, ConnError::WriteTimeout { side: Side::Client, after: wt }, evict_token);
                }
                if late(to_node.deadline) {
                    p.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    if closing {
                        // Leave the node behind.
                        to_node.abandon();
                        continue;
                    }
                    let xml = (p.closing)(Closing::NodeStalled);
                    to_node.abandon();
                    close!(
                        End::Error(ConnError::WriteTimeout { side: Side::Node, after: wt }),
                        to_client: Some(Bytes::from(xml)),
                        to_node: None::<Bytes>
                    );
                    continue;
                }
                match phase {
                    Phase::ClientClosed { .. } => {
                        // The node did not answer the close in time.
                        close!(End::ClientClosed, to_client: None::<Bytes>, to_node: None::<Bytes>);
                    }
                    Phase::Closing { .. } => {
                        p.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
                        return finish(end, ConnError::WriteTimeout { side: Side::Client, after: wt }, evict_token);
                    }
                    Phase::Open => {}
                }
            }
        }
    }
    drop(evict_token);
    end.unwrap_or(End::ClientClosed)
}

/// A request on the control point, or the proxy shutting down.
enum Signal {
    Control(Control),
    Shutdown,
}

/// The next [`Signal`]; gives the receivers back for the next one.
async fn next_signal(
    mut control: ControlReceiver,
    mut shutdown: watch::Receiver<bool>,
) -> (Signal, ControlReceiver, watch::Receiver<bool>) {
    let sig = tokio::select! {
        biased;
        c = control.recv() => Signal::Control(c),
        () = wait_shutdown(&mut shutdown) => Signal::Shutdown,
    };
    (sig, control, shutdown)
}

thread_local! {
    /// Each worker thread's read buffer for sessions whose own buffer is
    /// empty (see [`read_into`]).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Gives a drained read buffer's memory back (what was framed out of it is
/// owned by the out queue and freed once written).
fn release_if_drained(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

/// Reads up to `size` bytes from `r` into `buf`.
///
/// A session between stanzas (an empty `buf`) holds no read buffer, as
/// HAProxy does: the read goes into this worker thread's scratch buffer and
/// only the bytes read are copied into `buf`, which [`release_if_drained`]
/// frees again once they are framed out. A partly filled `buf` (a stanza
/// split across reads) is read into directly. Cancel safe: the bytes are
/// copied in the same poll that read them.
async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> io::Result<usize> {
    if !buf.is_empty() {
        buf.reserve(size);
        return r.read_buf(buf).await;
    }
    std::future::poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            // Only a read nested inside this one could hold the scratch
            // buffer; such a read gets a buffer of its own.
            let mut own = Vec::new();
            let mut held = scratch.try_borrow_mut();
            let space: &mut Vec<u8> = match held.as_deref_mut() {
                Ok(s) => s,
                Err(_) => &mut own,
            };
            if space.len() < size {
                space.resize(size, 0);
            }
            let mut rb = ReadBuf::new(&mut space[..size]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    buf.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

fn queue_injections(inj: Injections, to_client: &mut Outbox, to_node: &mut Outbox, wt: Duration) {
    for b in inj.to_client {
        to_client.push(b, wt);
    }
    for b in inj.to_node {
        to_node.push(b, wt);
    }
}

/// Ends the relay on a failure while closing (or before): the first end
/// decided stays the reason, the failure is logged with it.
fn finish(end: Option<End>, e: ConnError, token: Option<DoneToken>) -> End {
    drop(token);
    match end {
        None => End::Error(e),
        Some(first) => {
            debug!(error = %e, "while closing");
            first
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Writes and flushes `bytes` within `timeout` (pre-auth answers).
pub(super) async fn write_within<S: AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    bytes: &[u8],
    timeout: Duration,
    side: Side,
) -> Result<(), ConnError> {
    let w = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    match tokio::time::timeout(timeout, w).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ConnError::io(side, "write", e)),
        Err(_) => Err(ConnError::WriteTimeout {
            side,
            after: timeout,
        }),
    }
}

/// Reads into `buf` (for pre-auth reads).
pub(super) async fn read_some<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    io.read_buf(buf).await
}
