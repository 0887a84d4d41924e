//! How the rest of the proxy talks to a live connection: evict it, or inject
//! bytes into its client stream between two stanzas.
//!
//! A [`ConnHandle`] never blocks and never queues without bound: an
//! eviction replaces any earlier one (there is only one way to close a
//! stream), injected bytes are capped per connection. The connection's
//! relay takes requests through its [`ControlReceiver`] even while one of
//! its writes is pending, so a client that stops reading cannot delay its
//! own eviction beyond the write deadline.
//!
//! Whoever evicts can learn when the stream is really closed: every
//! [`Eviction`] may carry a [`DoneToken`], which the connection drops once
//! it has closed the client stream (or given up on it). [`DoneToken::pair`]
//! gives the waiting side.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

/// Identifies one client connection for the proxy's lifetime.
pub type ConnId = u64;

/// Dropped by a connection when the eviction it came with is done.
#[derive(Debug, Clone)]
pub struct DoneToken(#[allow(dead_code)] mpsc::Sender<()>);

/// Resolves when every [`DoneToken`] of its pair (and every clone) is gone.
#[derive(Debug)]
pub struct AllDone(mpsc::Receiver<()>);

impl DoneToken {
    /// A token to clone into evictions and the waiter for all of them.
    pub fn pair() -> (DoneToken, AllDone) {
        let (tx, rx) = mpsc::channel(1);
        (DoneToken(tx), AllDone(rx))
    }
}

impl AllDone {
    /// Waits until every token is dropped.
    pub async fn wait(mut self) {
        // Nothing is ever sent: `recv` returns `None` once all senders are gone.
        let _ = self.0.recv().await;
    }
}

/// Close the client stream with this stream error.
#[derive(Debug)]
pub struct Eviction {
    /// The serialised stream error, including `</stream:stream>`.
    pub xml: String,
    /// Dropped once the stream is closed.
    pub done: Option<DoneToken>,
}

/// Why bytes could not be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The connection has more injected bytes waiting than its cap allows.
    #[error("the connection's inject queue is full")]
    Full,
    /// The connection has ended.
    #[error("the connection has ended")]
    Closed,
}

/// What a connection is asked to do, in the order it should act.
#[derive(Debug)]
pub enum Control {
    /// Close the stream.
    Evict(Eviction),
    /// Write these bytes to the client between two stanzas.
    Inject(Bytes),
    /// Write these bytes to the node between two stanzas, as if the client
    /// had sent them (a replayed subscription).
    ToNode(Bytes),
}

#[derive(Debug, Default)]
struct Pending {
    evict: Option<Eviction>,
    inject: VecDeque<Bytes>,
    to_node: VecDeque<Bytes>,
    /// Bytes queued in `inject` and `to_node`.
    inject_bytes: usize,
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    pending: Mutex<Pending>,
    wake: Notify,
    inject_cap: usize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The proxy's side of a connection's control point. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<Inner>);

/// The connection's side of its control point.
#[derive(Debug)]
pub struct ControlReceiver(Arc<Inner>);

impl ConnHandle {
    /// A control point whose inject queue holds up to `inject_cap` bytes.
    pub fn new(inject_cap: usize) -> (ConnHandle, ControlReceiver) {
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            inject_cap,
        });
        (ConnHandle(inner.clone()), ControlReceiver(inner))
    }

    /// Asks the connection to close its stream. Returns `false` when the
    /// connection has already ended (the eviction, and its token, are
    /// dropped at once).
    pub fn evict(&self, e: Eviction) -> bool {
        let mut p = self.0.lock();
        if p.closed {
            return false;
        }
        p.evict = Some(e);
        drop(p);
        self.0.wake.notify_one();
        true
    }

    /// Queues bytes for the client, written between two stanzas.
    pub fn inject(&self, bytes: Bytes) -> Result<(), InjectError> {
        let mut p = self.0.lock();
        if p.closed {
            return Err(InjectError::Closed);
        }
        if p.inject_bytes + bytes.len() > self.0.inject_cap {
            return Err(InjectError::Full);
        }
        p.inject_bytes += bytes.len();
        p.inject.push_back(bytes);
        drop(p);
        self.0.wake.notify_one();
        Ok(())
    }

    /// Queues bytes for the node, written between two of the client's
    /// stanzas. Shares the cap with [`ConnHandle::inject`].
    pub fn send_to_node(&self, bytes: Bytes) -> Result<(), InjectError> {
        let mut p = self.0.lock();
        if p.closed {
            return Err(InjectError::Closed);
        }
        if p.inject_bytes + bytes.len() > self.0.inject_cap {
            return Err(InjectError::Full);
        }
        p.inject_bytes += bytes.len();
        p.to_node.push_back(bytes);
        drop(p);
        self.0.wake.notify_one();
        Ok(())
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.0.lock().closed
    }
}

impl ControlReceiver {
    /// The next request; an eviction comes before injected bytes. Cancel
    /// safe: a request is taken only when this returns.
    pub async fn recv(&mut self) -> Control {
        loop {
            if let Some(c) = self.try_recv() {
                return c;
            }
            self.0.wake.notified().await;
        }
    }

    /// The next request, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Control> {
        let mut p = self.0.lock();
        if let Some(e) = p.evict.take() {
            return Some(Control::Evict(e));
        }
        if let Some(b) = p.inject.pop_front() {
            p.inject_bytes -= b.len();
            return Some(Control::Inject(b));
        }
        let b = p.to_node.pop_front()?;
        p.inject_bytes -= b.len();
        Some(Control::ToNode(b))
    }
}

impl Drop for ControlReceiver {
    fn drop(&mut self) {
        // Release a late eviction's token: nothing is left to close.
        let mut p = self.0.lock();
        p.closed = true;
        p.evict = None;
        p.inject.clear();
        p.to_node.clear();
        p.inject_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evict(done: Option<DoneToken>) -> Eviction {
        Eviction {
            xml: "<stream:error/></stream:stream>".into(),
            done,
        }
    }

    #[tokio::test]
    async fn eviction_comes_first_and_replaces_an_earlier_one() {
        let (h, mut rx) = ConnHandle::new(100);
        h.inject(Bytes::from_static(b"<message/>")).unwrap();
        assert!(h.evict(evict(None)));
        assert!(h.evict(evict(None)));
        assert!(matches!(rx.recv().await, Control::Evict(_)));
        assert!(matches!(rx.recv().await, Control::Inject(_)));
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn inject_is_capped() {
        let (h, mut rx) = ConnHandle::new(10);
        h.inject(Bytes::from_static(b"0123456789")).unwrap();
        assert_eq!(h.inject(Bytes::from_static(b"x")), Err(InjectError::Full));
        assert!(rx.try_recv().is_some());
        h.inject(Bytes::from_static(b"x")).unwrap();
    }

    #[tokio::test]
    async fn tokens_resolve_when_the_connection_is_gone() {
        let (h, rx) = ConnHandle::new(10);
        let (token, all) = DoneToken::pair();
        assert!(h.evict(evict(Some(token.clone()))));
        drop(token);
        drop(rx);
        // The receiver dropped the eviction, and with it the last token.
        tokio::time::timeout(std::time::Duration::from_secs(5), all.wait())
            .await
            .expect("all done");
        assert!(h.is_closed());
        assert!(!h.evict(evict(None)));
        assert_eq!(h.inject(Bytes::new()), Err(InjectError::Closed));
    }
}
