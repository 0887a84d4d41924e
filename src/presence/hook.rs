//! The stanza hook that feeds the registry and carries its replays.
//!
//! From the client: directed presence (subscribe / unsubscribe by caps),
//! disco#info answers for a caps `node#ver`, unavailable presence (a
//! logout). From the node: the bind result (the session is live), and
//! disco#info queries for a `ver` the client itself no longer uses, which
//! the proxy answers from its cache. Between any two stanzas of the
//! session, the replays waiting in its outbox are written to the node.

use std::sync::Arc;

use bytes::Bytes;
use memchr::memmem;

use super::registry::{Registry, Slot};
use crate::connection::hooks::{Injections, SessionInfo, StanzaHook};
use crate::jid;
use crate::xmpp::framer::Frame;
use crate::xmpp::peek;

const NS_DISCO_INFO: &[u8] = b"http://jabber.org/protocol/disco#info";

/// Caps `ver`s one session's client used itself (it answers for them).
const MAX_OWN_VERS: usize = 8;

/// One session's temporary presence hook.
pub struct PresenceHook {
    reg: Arc<Registry>,
    session: SessionInfo,
    slot: Option<Arc<Slot>>,
    own_vers: Vec<Box<[u8]>>,
    logged_out: bool,
}

impl PresenceHook {
    pub(super) fn new(reg: Arc<Registry>, session: &SessionInfo) -> PresenceHook {
        PresenceHook {
            reg,
            session: session.clone(),
            slot: None,
            own_vers: Vec::new(),
            logged_out: false,
        }
    }

    fn flush(&self, inject: &mut Injections) {
        if let Some(s) = &self.slot {
            inject.to_node.extend(s.take_outbox());
        }
    }

    fn own_ver(&mut self, v: &[u8]) {
        if !self.own_vers.iter().any(|o| &**o == v) {
            if self.own_vers.len() >= MAX_OWN_VERS {
                self.own_vers.remove(0);
            }
            self.own_vers.push(v.into());
        }
    }

    fn client_presence(&mut self, frame: &[u8], f: &Frame) {
        let head = &frame[..f.head_end];
        let ptype = peek::attr(head, b"type");
        let Some(to) = peek::attr(head, b"to") else {
            match ptype {
                None => {
                    self.logged_out = false;
                    if let Some(v) = peek::caps_ver(frame) {
                        self.own_ver(v);
                    }
                }
                Some(b"unavailable") => self.logged_out = true,
                _ => {}
            }
            return;
        };
        if !matches!(ptype, None | Some(b"unavailable")) {
            return;
        }
        let Ok(target) = jid::normalize_full_to_bare(&peek::unescape(to)) else {
            return;
        };
        // Users of the group only (not a chat room, not another domain).
        let domain = |j: &str| j.split_once('@').map(|(_, d)| d.to_owned());
        if *target == *self.session.user || domain(&target) != domain(&self.session.user) {
            return;
        }
        match (ptype, peek::caps_ver(frame)) {
            (None, Some(ver)) => {
                self.own_ver(ver);
                self.reg.directed(&self.session.user, &target, frame, ver);
            }
            _ => self.reg.unsubscribe(&self.session.user, &target),
        }
    }

    /// A disco#info answer from the client: `(ver, <query> element)`.
    fn disco_result<'a>(frame: &'a [u8], f: &Frame) -> Option<(Vec<u8>, &'a [u8])> {
        let head = &frame[..f.head_end];
        if peek::attr(head, b"type") != Some(b"result") || !peek::contains(frame, NS_DISCO_INFO) {
            return None;
        }
        let (node, query) = query_of(frame)?;
        let ver = node.rsplit(|&b| b == b'#').next()?;
        Some((peek::unescape(ver).as_bytes().to_vec(), query))
    }

    /// A disco#info query from the node for a cached `ver` the client no
    /// longer uses: the answer, to write to the node.
    fn answer_from_cache(&self, frame: &[u8], f: &Frame) -> Option<Bytes> {
        let head = &frame[..f.head_end];
        if peek::attr(head, b"type") != Some(b"get") || !peek::contains(frame, NS_DISCO_INFO) {
            return None;
        }
        let (node, _) = query_of(frame)?;
        let ver = peek::unescape(node.rsplit(|&b| b == b'#').next()?);
        if self.own_vers.iter().any(|o| **o == *ver.as_bytes()) {
            return None;
        }
        let query = self.reg.cached_answer(&self.session.user, ver.as_bytes())?;
        let mut out = Vec::with_capacity(query.len() + 96);
        out.extend_from_slice(b"<iq type='result'");
        if let Some(id) = peek::attr(head, b"id") {
            push_attr(&mut out, b"id", id);
        }
        if let Some(from) = peek::attr(head, b"from") {
            push_attr(&mut out, b"to", from);
        }
        out.push(b'>');
        out.extend_from_slice(&query);
        out.extend_from_slice(b"</iq>");
        Some(Bytes::from(out))
    }
}

/// ` name='raw'` with a raw (still escaped) value, quoted so that it stays
/// one value (a raw value never holds both quote characters unescaped).
fn push_attr(out: &mut Vec<u8>, name: &[u8], raw: &[u8]) {
    let q = if raw.contains(&b'\'') { b'"' } else { b'\'' };
    out.push(b' ');
    out.extend_from_slice(name);
    out.push(b'=');
    out.push(q);
    out.extend_from_slice(raw);
    out.push(q);
}

/// The first `<query …>` element of a stanza: its `node` attribute (raw)
/// and the whole element.
fn query_of(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = memmem::find(frame, b"<query")?;
    let rest = &frame[at..];
    let head = &rest[..peek::head_end(rest)];
    let node = peek::attr(head, b"node")?;
    let len = if head.ends_with(b"/>") {
        head.len()
    } else {
        memmem::rfind(rest, b"</query>")? + b"</query>".len()
    };
    Some((node, &rest[..len]))
}

impl StanzaHook for PresenceHook {
    fn client_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        match f.name(frame) {
            b"presence" => self.client_presence(frame, f),
            b"iq" => {
                if let Some((ver, query)) = Self::disco_result(frame, f) {
                    self.reg.disco_answer(&self.session.user, &ver, query);
                }
            }
            _ => {}
        }
        self.flush(inject);
    }

    fn node_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        if self.slot.is_none() {
            if peek::bind_result(frame, f).is_some() {
                let s = &self.session;
                self.slot = Some(self.reg.bound(&s.user, s.node, s.conn, s.handle.clone()));
            }
            return;
        }
        if f.name(frame) == b"iq" {
            if let Some(answer) = self.answer_from_cache(frame, f) {
                self.reg
                    .stats
                    .disco_from_cache
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                inject.to_node.push(answer);
            }
        }
        self.flush(inject);
    }
}

impl Drop for PresenceHook {
    fn drop(&mut self) {
        if self.slot.is_some() {
            self.reg
                .ended(&self.session.user, self.session.conn, self.logged_out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TempPresenceConfig;
    use crate::control::ConnHandle;
    use crate::node::NodeId;
    use crate::xmpp::{FrameKind, Framer};

    /// Shows `stanza` to the hook from the client (`up`) or the node.
    fn show(h: &mut PresenceHook, up: bool, stanza: &str) -> Injections {
        let header =
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
        let input = format!("{header}{stanza}");
        let mut f = Framer::new(65_536);
        let mut buf = input.as_bytes();
        let mut inj = Injections::default();
        while let Some(fr) = f.next(buf).unwrap() {
            let frame = &buf[..fr.len];
            if fr.kind == FrameKind::Stanza {
                if up {
                    h.client_stanza(frame, &fr, &mut inj);
                } else {
                    h.node_stanza(frame, &fr, &mut inj);
                }
            }
            buf = &buf[fr.len..];
        }
        inj
    }

    #[test]
    fn the_hook_feeds_the_registry_and_answers_from_the_cache() {
        let reg = Arc::new(Registry::new(TempPresenceConfig::default()));
        let (handle, _rx) = ConnHandle::new(4096);
        let session = SessionInfo {
            conn: 7,
            user: Arc::from("alice@example.com"),
            home: NodeId::Node1,
            node: NodeId::Node1,
            handle,
        };
        let mut h = PresenceHook::new(reg.clone(), &session);
        show(&mut h, false, "<iq type='result' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>alice@example.com/desk</jid></bind></iq>");
        let caps = "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='V1'/>";
        show(
            &mut h,
            true,
            &format!("<presence to='Bob@Example.com/x'>{caps}</presence>"),
        );
        // Not kept: another domain (a chat room), oneself.
        show(
            &mut h,
            true,
            &format!("<presence to='room@conf.example.com/me'>{caps}</presence>"),
        );
        show(
            &mut h,
            true,
            &format!("<presence to='alice@example.com'>{caps}</presence>"),
        );
        assert_eq!(reg.targets_of("alice@example.com"), ["bob@example.com"]);
        show(&mut h, true, &format!("<iq type='result' id='d1' to='example.com'><query xmlns='http://jabber.org/protocol/disco#info' node='n#V1'><feature var='{}'/></query></iq>", std::str::from_utf8(crate::presence::registry::NOTIFY_FEATURE).unwrap()));
        assert!(reg.cached_answer("alice@example.com", b"V1").is_some());
        // The client uses V1 itself: it answers, not the proxy.
        let q = "<iq type='get' id='q1' from='example.com' to='alice@example.com/desk'><query xmlns='http://jabber.org/protocol/disco#info' node='n#V1'/></iq>";
        assert!(show(&mut h, false, q).to_node.is_empty());
        // A new session of the same user that never used V1: the proxy answers.
        let mut h2 = PresenceHook::new(
            reg.clone(),
            &SessionInfo {
                conn: 8,
                ..session.clone()
            },
        );
        show(&mut h2, false, "<iq type='result' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>alice@example.com/desk</jid></bind></iq>");
        let inj = show(&mut h2, false, q);
        assert_eq!(inj.to_node.len(), 1);
        let a = std::str::from_utf8(&inj.to_node[0]).unwrap();
        assert!(
            a.starts_with("<iq type='result' id='q1' to='example.com'><query"),
            "{a}"
        );
        assert!(
            a.contains("temp-presence+notify") && a.ends_with("</query></iq>"),
            "{a}"
        );
        assert_eq!(
            reg.stats
                .disco_from_cache
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Directed unavailable unsubscribes; a logout then drops nothing more.
        show(
            &mut h,
            true,
            "<presence type='unavailable' to='bob@example.com'/>",
        );
        assert_eq!(reg.pairs(), 0);
        show(
            &mut h,
            true,
            &format!("<presence to='bob@example.com'>{caps}</presence>"),
        );
        show(&mut h, true, "<presence type='unavailable'/>");
        drop(h);
        assert_eq!(reg.pairs(), 1, "another session is still open");
        drop(h2);
        assert_eq!(reg.pairs(), 1, "no logout on that one: kept to linger");
    }

    #[test]
    fn queries_are_found() {
        let s = b"<iq type='result' id='1'><query xmlns='http://jabber.org/protocol/disco#info' node='n#v='><feature var='x'/></query></iq>";
        let (node, q) = query_of(s).unwrap();
        assert_eq!(node, b"n#v=");
        assert!(q.starts_with(b"<query") && q.ends_with(b"</query>"));
        let s = b"<iq type='get'><query xmlns='http://jabber.org/protocol/disco#info' node='n#v'/></iq>";
        assert_eq!(query_of(s).unwrap().1, &s[15..s.len() - 5]);
        let mut out = Vec::new();
        push_attr(&mut out, b"id", b"a'b");
        assert_eq!(out, b" id=\"a'b\"");
    }
}
