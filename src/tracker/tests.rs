use super::*;

fn handle() -> (ConnHandle, mpsc::Receiver<Control>) {
    mpsc::channel(4)
}

#[tokio::test]
async fn bind_presence_close() {
    let t = Tracker::new();
    let (h1, _r1) = handle();
    let (h2, _r2) = handle();
    t.on_bind("Alice@example.com/desk", 0, 0, 1, h1);
    t.on_bind("alice@example.com/phone", 0, 1, 2, h2);
    let u = t.lookup("alice@example.com").unwrap();
    assert_eq!(u.sessions.len(), 2);
    assert_eq!(t.count_on(0), 1);
    assert_eq!(t.count_on(1), 1);
    assert_eq!(t.sessions_on(1)[0].1.as_ref(), "alice@example.com/phone");

    let p = Presence {
        available: true,
        show: Show::Dnd,
        priority: 5,
        status_hash: status_hash(b"In a meeting"),
    };
    t.on_presence(1, p);
    let u = t.lookup("alice@example.com/whatever").unwrap();
    let desk = u.sessions.iter().find(|s| s.conn == 1).unwrap();
    assert_eq!(desk.presence, p);

    t.on_close(1);
    assert_eq!(t.count_on(0), 0);
    assert_eq!(t.lookup("alice@example.com").unwrap().sessions.len(), 1);
    t.on_close(2);
    assert!(t.lookup("alice@example.com").is_none());
    assert_eq!(t.user_count(), 0);
    // Closing twice, or an unknown connection, changes nothing.
    t.on_close(2);
    t.on_close(99);
    assert_eq!((t.count_on(0), t.count_on(1)), (0, 0));
}

#[tokio::test]
async fn rebind_on_the_same_connection_replaces() {
    let t = Tracker::new();
    let (h, _r) = handle();
    t.on_bind("bob@example.com/a", 1, 1, 7, h.clone());
    t.on_bind("bob@example.com/b", 1, 1, 7, h);
    let u = t.lookup("bob@example.com").unwrap();
    assert_eq!(u.sessions.len(), 1);
    assert_eq!(u.sessions[0].full_jid.as_ref(), "bob@example.com/b");
    assert_eq!(t.count_on(1), 1);
}

#[tokio::test]
async fn handles_reach_the_connection() {
    let t = Tracker::new();
    let (h, mut r) = handle();
    t.on_bind("carol@example.com/x", 0, 0, 3, h);
    t.handle_of(3)
        .unwrap()
        .send(Control::Evict("bye".into()))
        .await
        .unwrap();
    assert!(matches!(r.recv().await, Some(Control::Evict(s)) if s == "bye"));
}

#[test]
fn priorities_and_shows() {
    assert_eq!(parse_priority(b"5"), 5);
    assert_eq!(parse_priority(b"-1"), -1);
    assert_eq!(parse_priority(b"1000"), 127);
    assert_eq!(parse_priority(b"x"), 0);
    assert_eq!(Show::parse(b"xa"), Show::Xa);
    assert_eq!(Show::parse(b"bogus"), Show::Online);
    assert_ne!(status_hash(b""), 0);
}
