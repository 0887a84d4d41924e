//! Stream management (XEP-0198) accounting of one relayed stream, sans-IO.
//!
//! The proxy never takes part in stream management: `<enable/>`, `<r/>`
//! and `<a/>` go between the client and the node unchanged. It only
//! follows them, so that when the node side of a stream dies (or the
//! proxy ends the stream: a move, a shutdown) it knows which of the
//! client's stanzas the node never acknowledged, and can bounce each such
//! `<message>` back to its sender instead of losing it silently.
//!
//! Per XEP-0198 §4 the node counts the `<message/>`, `<presence/>` and
//! `<iq/>` it received from the client since the client's `<enable/>`
//! (or, after `<resumed h=…/>`, from that `h`), modulo 2³²; its
//! `<a h=…/>` acknowledges every stanza up to `h`. [`StreamAccount`] does
//! the same counting on the frames the relay forwards and keeps a copy of
//! each unacknowledged `<message>` (not `type='error'`: an error is never
//! answered with an error), within [`SmLimits`]; beyond them it stops
//! retaining and says so.
//!
//! Cost: while stream management is off (most streams), one comparison of
//! the element name per client stanza and none per node stanza; while it is
//! on, a counter per client stanza, one copy per client `<message>`, and a
//! name comparison per node stanza.

use std::collections::VecDeque;

use bytes::Bytes;
use quick_xml::escape::escape;

use super::framer::Frame;
use super::peek;

/// Namespace prefix of stream management (`urn:xmpp:sm:3`, and the older `:2`).
const NS_SM: &[u8] = b"urn:xmpp:sm:";

/// How much of a client's unacknowledged traffic one stream may retain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmLimits {
    /// Unacknowledged `<message>` stanzas retained.
    pub max_unacked_stanzas: usize,
    /// Bytes of unacknowledged `<message>` stanzas retained.
    pub max_unacked_bytes: usize,
}

impl Default for SmLimits {
    fn default() -> Self {
        SmLimits {
            max_unacked_stanzas: 500,
            max_unacked_bytes: 1 << 20,
        }
    }
}

/// Where the stream is in its stream management negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmState {
    /// No stream management (the default).
    Off,
    /// The client sent `<enable/>`; the node has not answered yet (the
    /// node counts from the `<enable/>` on).
    Enabling,
    /// The client sent `<resume/>`; waiting for `<resumed/>` or `<failed/>`.
    Resuming,
    /// The node answered `<enabled/>` or `<resumed/>`.
    On,
}

/// What [`StreamAccount::client_frame`] did with a client stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    /// Nothing to retain (not counted, or not a message).
    No,
    /// A copy of the message is kept until the node acknowledges it.
    Yes,
    /// A message that should be retained but is over [`SmLimits`]: it
    /// cannot be bounced if the node never acknowledges it.
    OverLimit,
}

/// The XEP-0198 accounting of one client stream.
#[derive(Debug)]
pub struct StreamAccount {
    limits: SmLimits,
    state: SmState,
    /// Stanzas the client sent since `<enable/>` (or the `h` resumed from),
    /// modulo 2³².
    sent: u32,
    /// The node's last acknowledged `h`.
    acked: u32,
    /// Unacknowledged messages retained, oldest first, with their number.
    unacked: VecDeque<(u32, Bytes)>,
    /// Bytes in `unacked`.
    bytes: usize,
}

impl StreamAccount {
    /// An account with no stream management yet.
    pub fn new(limits: SmLimits) -> Self {
        StreamAccount {
            limits,
            state: SmState::Off,
            sent: 0,
            acked: 0,
            unacked: VecDeque::new(),
            bytes: 0,
        }
    }

    /// The negotiation state.
    pub fn state(&self) -> SmState {
        self.state
    }

    /// Whether node stanzas need to be shown ([`StreamAccount::node_frame`]).
    #[inline]
    pub fn watching(&self) -> bool {
        self.state != SmState::Off
    }

    /// Stanzas counted and not acknowledged by the node.
    pub fn unacked_count(&self) -> u32 {
        self.sent.wrapping_sub(self.acked)
    }

    /// Messages retained (unacknowledged).
    pub fn retained(&self) -> usize {
        self.unacked.len()
    }

    /// Bytes retained.
    pub fn retained_bytes(&self) -> usize {
        self.bytes
    }

    /// A whole first-level element from the client, as it is forwarded.
    #[inline]
    pub fn client_frame(&mut self, frame: &[u8], f: &Frame) -> Retained {
        let name = f.name(frame);
        if self.state == SmState::Off {
            if (name == b"enable" || name == b"resume") && is_sm(frame, f) {
                self.start(if name == b"enable" {
                    SmState::Enabling
                } else {
                    SmState::Resuming
                });
            }
            return Retained::No;
        }
        if self.state == SmState::Resuming {
            // Stanzas before <resumed/> are not counted by the node's old
            // session; the client resends its own after <resumed/>.
            return Retained::No;
        }
        match name {
            b"message" => self.count(),
            b"presence" | b"iq" => {
                self.count();
                return Retained::No;
            }
            _ => return Retained::No,
        }
        if peek::attr(&frame[..f.head_end], b"type") == Some(b"error") {
            return Retained::No;
        }
        if self.unacked.len() >= self.limits.max_unacked_stanzas
            || self.bytes + frame.len() > self.limits.max_unacked_bytes
        {
            return Retained::OverLimit;
        }
        self.bytes += frame.len();
        self.unacked
            .push_back((self.sent, Bytes::copy_from_slice(frame)));
        Retained::Yes
    }

    /// A whole first-level element from the node. Only needed while
    /// [`StreamAccount::watching`].
    #[inline]
    pub fn node_frame(&mut self, frame: &[u8], f: &Frame) {
        let name = f.name(frame);
        match (self.state, name) {
            (SmState::Off, _) => {}
            (SmState::On, b"a") => {
                if let Some(h) = h_attr(frame, f) {
                    self.ack(h);
                }
            }
            (SmState::Enabling, b"enabled") => self.state = SmState::On,
            (SmState::Resuming, b"resumed") => {
                // The node's old session counted `h` stanzas; the client
                // resends the rest, which this stream counts from here.
                let h = h_attr(frame, f).unwrap_or(0);
                self.sent = h;
                self.acked = h;
                self.state = SmState::On;
            }
            (SmState::Enabling | SmState::Resuming, b"failed") => self.stop(),
            _ => {}
        }
    }

    /// Takes every retained message the node has not acknowledged, oldest
    /// first; the account forgets them.
    pub fn take_unacked(&mut self) -> impl Iterator<Item = Bytes> + '_ {
        self.bytes = 0;
        self.unacked.drain(..).map(|(_, m)| m)
    }

    /// Error bounces (RFC 6120 §8.3.3.18 `<recipient-unavailable/>`, type
    /// `wait`) for every retained message the node has not acknowledged,
    /// addressed to `client_jid`, concatenated; and how many there are.
    pub fn bounces(&mut self, client_jid: Option<&str>) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut n = 0;
        for m in self.take_unacked() {
            bounce_into(&mut out, &m, client_jid);
            n += 1;
        }
        (out, n)
    }

    fn start(&mut self, state: SmState) {
        self.state = state;
        self.sent = 0;
        self.acked = 0;
        self.unacked.clear();
        self.bytes = 0;
    }

    fn stop(&mut self) {
        self.start(SmState::Off);
    }

    #[inline]
    fn count(&mut self) {
        self.sent = self.sent.wrapping_add(1);
    }

    /// The node acknowledged every stanza up to `h`. An `h` behind the last
    /// one or beyond what was sent is the node's error: ignored, so that
    /// nothing retained is forgotten because of it.
    fn ack(&mut self, h: u32) {
        let newly = h.wrapping_sub(self.acked);
        if newly == 0 || newly > self.unacked_count() {
            return;
        }
        let base = self.acked;
        while let Some((seq, m)) = self.unacked.front() {
            if seq.wrapping_sub(base) > newly {
                break;
            }
            self.bytes -= m.len();
            self.unacked.pop_front();
        }
        self.acked = h;
    }
}

/// Whether the element's `xmlns` is stream management's.
fn is_sm(frame: &[u8], f: &Frame) -> bool {
    peek::attr(&frame[..f.head_end], b"xmlns").is_some_and(|ns| ns.starts_with(NS_SM))
}

/// The `h` attribute of `<a/>` / `<resumed/>`, if it is a number.
fn h_attr(frame: &[u8], f: &Frame) -> Option<u32> {
    let h = peek::attr(&frame[..f.head_end], b"h")?;
    std::str::from_utf8(h).ok()?.parse().ok()
}

/// Appends the error bounce of `msg` (a whole `<message>` element) to
/// `out`: `from` its `to`, `to` the client, its `id`, its payload, and
/// `<error type='wait'><recipient-unavailable/></error>`.
pub fn bounce_into(out: &mut Vec<u8>, msg: &[u8], client_jid: Option<&str>) {
    let head_end = peek::head_end(msg);
    let head = &msg[..head_end];
    out.extend_from_slice(b"<message type='error'");
    for (ours, theirs) in [(&b"from"[..], &b"to"[..]), (b"id", b"id")] {
        if let Some(v) = peek::attr(head, theirs) {
            out.push(b' ');
            out.extend_from_slice(ours);
            out.extend_from_slice(b"='");
            out.extend_from_slice(escape(peek::unescape(v).as_ref()).as_bytes());
            out.push(b'\'');
        }
    }
    if let Some(j) = client_jid {
        out.extend_from_slice(b" to='");
        out.extend_from_slice(escape(j).as_bytes());
        out.push(b'\'');
    }
    out.push(b'>');
    // The original payload, so that the client can tell which message
    // failed (RFC 6120 §8.3.1 allows it); not when the children may use
    // a prefix the message element declares.
    if !head.ends_with(b"/>") && !peek::contains(head, b"xmlns:") {
        if let Some(close) = memchr::memmem::rfind(msg, b"</") {
            if close >= head_end {
                out.extend_from_slice(&msg[head_end..close]);
            }
        }
    }
    out.extend_from_slice(
        b"<error type='wait'><recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
    );
}

#[cfg(test)]
mod tests;
