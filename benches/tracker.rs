//! The session tracker under load: 1 M users, 1 and 2 threads, a
//! read-dominant mix and a churn mix, against the same tracker logic on a
//! sharded `RwLock<HashMap>`, on `DashMap` (the previous tracker) and on
//! papaya (lock-free reads), all in one run. Method: `benches/README.md`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::Criterion;
use prg_proxy::tracker::{ConnHandle, Presence, Show, Tracker};
use tokio::time::Instant as TokioInstant;

mod common;
use common::alloc;
use common::rng::Rng;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Tracked users (one session each).
fn users() -> u64 {
    std::env::var("TRACKER_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}
/// Wall time per (store, mix, threads) cell.
const CELL_TIME: Duration = Duration::from_millis(1000);
/// Upper bound on operations per thread per cell, whatever the speed.
const CELL_MAX_OPS: u64 = 50_000_000;
/// Every n-th read is timed for the latency percentiles.
const SAMPLE_EVERY: u64 = 16;
/// Reads per batch in the batched mix.
const BATCH: usize = 16;

// ---------------------------------------------------------------- stores

/// What the workload does, on any implementation.
trait Store: Sync {
    fn bind(&self, full: &str, node: usize, conn: u64, h: &ConnHandle);
    fn presence(&self, conn: u64, p: Presence);
    fn close(&self, conn: u64);
    /// The routing read: is the user on, and where (no copy of sessions).
    fn read(&self, bare: &str) -> bool;
    /// The same read for each of `keys` (as eviction reads a node's users):
    /// each store's best way to read many keys at once.
    /// Where the bytes are, per session, if the store can tell.
    fn split(&self, _sessions: u64) -> Option<String> {
        None
    }
    fn read_batch(&self, keys: &[&str], out: &mut [bool]) {
        for (k, o) in keys.iter().zip(out.iter_mut()) {
            *o = self.read(k);
        }
    }
}

impl Store for Tracker {
    fn bind(&self, full: &str, node: usize, conn: u64, h: &ConnHandle) {
        let node =
            prg_proxy::node::NodeId::from_index(node).unwrap_or(prg_proxy::node::NodeId::Node1);
        self.on_bind(full, node, node, conn, h.clone());
    }
    fn presence(&self, conn: u64, p: Presence) {
        self.on_presence(conn, p);
    }
    fn close(&self, conn: u64) {
        self.on_close(conn);
    }
    fn read(&self, bare: &str) -> bool {
        self.summary(bare).is_some_and(|s| s.sessions > 0)
    }
    fn split(&self, n: u64) -> Option<String> {
        let m = self.memory();
        let per = |b: usize| b as f64 / n as f64;
        Some(format!(
            "user slots {:.0} + sessions {:.0} + JID strings {:.0} + multi-session lists {:.0} B/session",
            per(m.user_slots),
            per(m.sessions),
            per(m.jids),
            per(m.extra)
        ))
    }
    fn read_batch(&self, keys: &[&str], out: &mut [bool]) {
        let mut sums = [None; BATCH];
        let sums = &mut sums[..keys.len()];
        self.summaries(keys, sums);
        for (s, o) in sums.iter().zip(out.iter_mut()) {
            *o = s.is_some_and(|s| s.sessions > 0);
        }
    }
}

/// The minimal map interface the baseline tracker needs.
trait Map<K, V>: Sync + Send {
    fn new() -> Self;
    fn read<Q, R>(&self, k: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized;
    /// Reads each of `keys`; `f(i, value)` for the i-th.
    fn read_many<Q>(&self, keys: &[&Q], mut f: impl FnMut(usize, Option<&V>))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        for (i, k) in keys.iter().enumerate() {
            if self.read(*k, |v| f(i, Some(v))).is_none() {
                f(i, None);
            }
        }
    }
    fn upsert(&self, k: K, ins: impl FnOnce() -> V, upd: impl Fn(&mut V));
    /// Updates in place; `f` returns true to remove the entry.
    fn update<Q>(&self, k: &Q, f: impl Fn(&mut V) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized;
    fn insert(&self, k: K, v: V);
    fn remove<Q>(&self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized;
}

/// `RwLock<HashMap>` shards with std's hasher: the plain baseline.
struct Sharded<K, V> {
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<K, V>>]>,
}

impl<K: Hash + Eq + Send + Sync, V: Send + Sync> Sharded<K, V> {
    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> &RwLock<HashMap<K, V>> {
        let h = self.hasher.hash_one(k);
        &self.shards[(h >> 40) as usize & (self.shards.len() - 1)]
    }
}

impl<K: Hash + Eq + Send + Sync, V: Send + Sync> Map<K, V> for Sharded<K, V> {
    fn new() -> Self {
        Sharded {
            hasher: RandomState::new(),
            shards: (0..64).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
    fn read<Q, R>(&self, k: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(k).read().ok()?.get(k).map(f)
    }
    fn upsert(&self, k: K, ins: impl FnOnce() -> V, upd: impl Fn(&mut V)) {
        if let Ok(mut m) = self.shard(&k).write() {
            m.entry(k).and_modify(upd).or_insert_with(ins);
        }
    }
    fn update<Q>(&self, k: &Q, f: impl Fn(&mut V) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Ok(mut m) = self.shard(k).write() {
            if m.get_mut(k).is_some_and(f) {
                m.remove(k);
            }
        }
    }
    fn insert(&self, k: K, v: V) {
        if let Ok(mut m) = self.shard(&k).write() {
            m.insert(k, v);
        }
    }
    fn remove<Q>(&self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(k).write().ok()?.remove(k)
    }
}

/// DashMap: what the previous tracker used.
struct Dash<K, V>(dashmap::DashMap<K, V>);

impl<K: Hash + Eq + Send + Sync, V: Send + Sync> Map<K, V> for Dash<K, V> {
    fn new() -> Self {
        Dash(dashmap::DashMap::new())
    }
    fn read<Q, R>(&self, k: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(k).map(|v| f(&v))
    }
    fn upsert(&self, k: K, ins: impl FnOnce() -> V, upd: impl Fn(&mut V)) {
        self.0.entry(k).and_modify(upd).or_insert_with(ins);
    }
    fn update<Q>(&self, k: &Q, f: impl Fn(&mut V) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.remove_if_mut(k, |_, v| f(v));
    }
    fn insert(&self, k: K, v: V) {
        self.0.insert(k, v);
    }
    fn remove<Q>(&self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.remove(k).map(|(_, v)| v)
    }
}

/// papaya: lock-free reads; updates replace the value (copy on write).
/// `BLOCKING` picks `ResizeMode::Blocking`, which papaya's documentation
/// says tends to be better for throughput than the default incremental
/// resizing (with it, a read may have to look in two tables while a resize
/// is under way, and writers move only 64 entries at a time).
struct Papaya<K, V, const BLOCKING: bool>(papaya::HashMap<K, V>);

impl<K, V, const BLOCKING: bool> Map<K, V> for Papaya<K, V, BLOCKING>
where
    K: Hash + Eq + Clone + Send + Sync,
    V: Clone + Send + Sync,
{
    fn new() -> Self {
        let mode = if BLOCKING {
            papaya::ResizeMode::Blocking
        } else {
            papaya::ResizeMode::default()
        };
        Papaya(papaya::HashMap::builder().resize_mode(mode).build())
    }
    fn read<Q, R>(&self, k: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.pin().get(k).map(f)
    }
    fn read_many<Q>(&self, keys: &[&Q], mut f: impl FnMut(usize, Option<&V>))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // As papaya's documentation recommends: one pinned guard for the
        // whole batch (pinning costs about an uncontended lock).
        let pin = self.0.pin();
        for (i, k) in keys.iter().enumerate() {
            f(i, pin.get(*k));
        }
    }
    fn upsert(&self, k: K, ins: impl FnOnce() -> V, upd: impl Fn(&mut V)) {
        self.0.pin().update_or_insert_with(
            k,
            |v| {
                let mut v = v.clone();
                upd(&mut v);
                v
            },
            ins,
        );
    }
    fn update<Q>(&self, k: &Q, f: impl Fn(&mut V) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let pin = self.0.pin();
        let Some((key, _)) = pin.get_key_value(k) else {
            return;
        };
        pin.compute(key.clone(), |e| match e {
            Some((_, v)) => {
                let mut v = v.clone();
                if f(&mut v) {
                    papaya::Operation::Remove
                } else {
                    papaya::Operation::Insert(v)
                }
            }
            None => papaya::Operation::Abort(()),
        });
    }
    fn insert(&self, k: K, v: V) {
        self.0.pin().insert(k, v);
    }
    fn remove<Q>(&self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.pin().remove(k).cloned()
    }
}

/// The fields the real tracker keeps, so memory is compared like for like
/// (the workload reads only some of them).
#[allow(dead_code)]
#[derive(Clone)]
struct SRec {
    full: Arc<str>,
    conn: u64,
    handle: ConnHandle,
    bound_at: TokioInstant,
    presence: Presence,
    node: u8,
}

#[derive(Clone)]
struct URec {
    home: u8,
    serving: u8,
    sessions: Vec<SRec>,
}

/// The previous tracker's logic (users by lower-cased bare JID, a
/// connection map, a per-node index, counters) over any map.
struct Baseline<U, C, N> {
    users: U,
    conns: C,
    per_node: [N; 2],
    counts: [AtomicUsize; 2],
}

impl<U, C, N> Baseline<U, C, N>
where
    U: Map<Arc<str>, URec>,
    C: Map<u64, (Arc<str>, u8)>,
    N: Map<u64, Arc<str>>,
{
    fn new() -> Self {
        Baseline {
            users: U::new(),
            conns: C::new(),
            per_node: [N::new(), N::new()],
            counts: Default::default(),
        }
    }
}

impl<U, C, N> Store for Baseline<U, C, N>
where
    U: Map<Arc<str>, URec>,
    C: Map<u64, (Arc<str>, u8)>,
    N: Map<u64, Arc<str>>,
{
    fn bind(&self, full: &str, node: usize, conn: u64, h: &ConnHandle) {
        self.close(conn);
        let bare: Arc<str> = Arc::from(full.split('/').next().unwrap_or(full).to_ascii_lowercase());
        let full: Arc<str> = Arc::from(full);
        let s = SRec {
            full: full.clone(),
            conn,
            handle: h.clone(),
            bound_at: TokioInstant::now(),
            presence: Presence::default(),
            node: node as u8,
        };
        self.users.upsert(
            bare.clone(),
            || URec {
                home: node as u8,
                serving: node as u8,
                sessions: vec![s.clone()],
            },
            |u| {
                u.serving = node as u8;
                u.sessions.push(s.clone());
            },
        );
        self.conns.insert(conn, (bare, node as u8));
        self.per_node[node].insert(conn, full);
        self.counts[node].fetch_add(1, Ordering::Relaxed);
    }
    fn presence(&self, conn: u64, p: Presence) {
        let Some(bare) = self.conns.read(&conn, |c| c.0.clone()) else {
            return;
        };
        self.users.update(&*bare, |u| {
            if let Some(s) = u.sessions.iter_mut().find(|s| s.conn == conn) {
                s.presence = p;
            }
            false
        });
    }
    fn close(&self, conn: u64) {
        let Some((bare, node)) = self.conns.remove(&conn) else {
            return;
        };
        if self.per_node[usize::from(node)].remove(&conn).is_some() {
            self.counts[usize::from(node)].fetch_sub(1, Ordering::Relaxed);
        }
        self.users.update(&*bare, |u| {
            u.sessions.retain(|s| s.conn != conn);
            u.sessions.is_empty()
        });
    }
    fn read(&self, bare: &str) -> bool {
        // Keys are generated lower-case, so the baselines skip case folding
        // (the previous tracker allocated a lower-cased copy here): this
        // favours them.
        self.users
            .read(bare, |u| {
                black_box((u.home, u.serving));
                !u.sessions.is_empty()
            })
            .unwrap_or(false)
    }
    fn read_batch(&self, keys: &[&str], out: &mut [bool]) {
        self.users.read_many(keys, |i, u| {
            out[i] = u.is_some_and(|u| {
                black_box((u.home, u.serving));
                !u.sessions.is_empty()
            })
        });
    }
}

type StdSharded =
    Baseline<Sharded<Arc<str>, URec>, Sharded<u64, (Arc<str>, u8)>, Sharded<u64, Arc<str>>>;
type DashBase = Baseline<Dash<Arc<str>, URec>, Dash<u64, (Arc<str>, u8)>, Dash<u64, Arc<str>>>;
type PapayaBase = Baseline<
    Papaya<Arc<str>, URec, false>,
    Papaya<u64, (Arc<str>, u8), false>,
    Papaya<u64, Arc<str>, false>,
>;
type PapayaBlocking = Baseline<
    Papaya<Arc<str>, URec, true>,
    Papaya<u64, (Arc<str>, u8), true>,
    Papaya<u64, Arc<str>, true>,
>;

// -------------------------------------------------------------- workload

/// Writes `u{idx}@example.com` (and `/desk` when `full`) into `buf`
/// without allocating, so key generation costs nothing measurable.
fn jid(buf: &mut [u8; 40], idx: u64, full: bool) -> &str {
    let mut digits = [0u8; 20];
    let mut n = idx;
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut w = 0;
    buf[w] = b'u';
    w += 1;
    for k in (0..d).rev() {
        buf[w] = digits[k];
        w += 1;
    }
    let tail: &[u8] = if full {
        b"@example.com/desk"
    } else {
        b"@example.com"
    };
    buf[w..w + tail.len()].copy_from_slice(tail);
    w += tail.len();
    std::str::from_utf8(&buf[..w]).unwrap_or("")
}

#[derive(Clone, Copy, PartialEq)]
enum Mix {
    /// 98 % reads, 1 % presence updates, 1 % re-logins (logout + login).
    Read,
    /// The same operations as `Read`, the reads grouped in batches of
    /// [`BATCH`] (`read_batch`).
    ReadBatch,
    /// 50 % presence updates, 50 % re-logins.
    Churn,
}

struct CellResult {
    ops: u64,
    secs: f64,
    lat_ns: Vec<u32>,
}

fn populate<S: Store>(s: &S, n: u64, h: &ConnHandle) {
    let mut buf = [0u8; 40];
    for i in 0..n {
        s.bind(jid(&mut buf, i, true), (i % 2) as usize, i, h);
    }
}

fn run_cell<S: Store>(s: &S, n: u64, mix: Mix, threads: u64, h: &ConnHandle) -> CellResult {
    let start = Instant::now();
    let results: Vec<(u64, Vec<u32>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let h = h.clone();
                sc.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9 ^ (t + 1).wrapping_mul(0x1234_5678_9abc));
                    let mut buf = [0u8; 40];
                    let mut bufs = [[0u8; 40]; BATCH];
                    let mut lens = [0usize; BATCH];
                    let mut queued = 0usize;
                    let mut flushes = 0u64;
                    let mut outs = [false; BATCH];
                    let mut lat = Vec::with_capacity(1 << 20);
                    let deadline = Instant::now() + CELL_TIME;
                    let mut ops = 0u64;
                    let mut i = 0u64;
                    let p = Presence {
                        available: true,
                        show: Show::Away,
                        priority: 1,
                        status_hash: 42,
                        caps_hash: 7,
                    };
                    while ops < CELL_MAX_OPS {
                        if i % 1024 == 0 && Instant::now() >= deadline {
                            break;
                        }
                        i += 1;
                        let r = rng.next();
                        let pick = r % 100;
                        // Writes stay on this thread's connections, as in
                        // the proxy (one task per connection).
                        let own = ((r >> 8) % (n / threads)) * threads + t;
                        let read = match mix {
                            Mix::Read | Mix::ReadBatch => pick < 98,
                            Mix::Churn => false,
                        };
                        if read && mix == Mix::ReadBatch {
                            let idx = (r >> 8) % n;
                            lens[queued] = jid(&mut bufs[queued], idx, false).len();
                            queued += 1;
                            ops += 1;
                            if queued == BATCH {
                                queued = 0;
                                flushes += 1;
                                let mut keys = [""; BATCH];
                                for ((k, b), &l) in keys.iter_mut().zip(&bufs).zip(&lens) {
                                    *k = std::str::from_utf8(&b[..l]).unwrap_or("");
                                }
                                if flushes % SAMPLE_EVERY == 0 && lat.len() < lat.capacity() {
                                    let t0 = Instant::now();
                                    s.read_batch(&keys, &mut outs);
                                    // Per read: the batch's time shared out.
                                    lat.push((t0.elapsed().as_nanos() / BATCH as u128) as u32);
                                } else {
                                    s.read_batch(&keys, &mut outs);
                                }
                                black_box(&outs);
                            }
                        } else if read {
                            let idx = (r >> 8) % n;
                            let key = jid(&mut buf, idx, false);
                            if i % SAMPLE_EVERY == 0 && lat.len() < lat.capacity() {
                                let t0 = Instant::now();
                                black_box(s.read(key));
                                lat.push(t0.elapsed().as_nanos() as u32);
                            } else {
                                black_box(s.read(key));
                            }
                            ops += 1;
                        } else if pick % 2 == 0 {
                            s.presence(own, p);
                            ops += 1;
                        } else {
                            s.close(own);
                            s.bind(jid(&mut buf, own, true), (own % 2) as usize, own, &h);
                            ops += 2;
                        }
                    }
                    (ops, lat)
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut lat_ns = Vec::new();
    let mut ops = 0;
    for (o, l) in results {
        ops += o;
        lat_ns.extend(l);
    }
    lat_ns.sort_unstable();
    CellResult { ops, secs, lat_ns }
}

fn pct(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p) as usize]
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// One row of the summary.
struct Row {
    store: &'static str,
    mix: &'static str,
    threads: u64,
    mops: f64,
    p50: u32,
    p99: u32,
}

fn bench_store<S: Store>(
    name: &'static str,
    make: impl FnOnce() -> S,
    c: &mut Criterion,
    rows: &mut Vec<Row>,
    mem: &mut Vec<(&'static str, f64, f64)>,
) {
    // TRACKER_BENCH_ONLY=name runs one store (for quick experiments).
    if std::env::var("TRACKER_BENCH_ONLY").is_ok_and(|only| only != name) {
        return;
    }
    let n = users();
    let (tx, _rx) = ConnHandle::new(1024);
    let (live0, rss0) = (alloc::live_bytes(), rss_bytes());
    let t = Instant::now();
    let s = make();
    populate(&s, n, &tx);
    let fill = t.elapsed();
    let (live1, rss1) = (alloc::live_bytes(), rss_bytes());
    let per = (live1 - live0) as f64 / n as f64;
    let per_rss = rss1.saturating_sub(rss0) as f64 / n as f64;
    mem.push((name, per, per_rss));
    eprintln!("{name}: {n} sessions bound in {fill:.2?}; {per:.0} B/session allocated");
    if let Some(split) = s.split(n) {
        println!("SUMMARY tracker: {name:<16} memory split: {split}");
    }
    for (mix, mname) in [
        (Mix::Read, "read-98%"),
        (Mix::ReadBatch, "batch-98%"),
        (Mix::Churn, "churn"),
    ] {
        for threads in [1, 2] {
            let r = run_cell(&s, n, mix, threads, &tx);
            rows.push(Row {
                store: name,
                mix: mname,
                threads,
                mops: r.ops as f64 / r.secs / 1e6,
                p50: pct(&r.lat_ns, 0.50),
                p99: pct(&r.lat_ns, 0.99),
            });
        }
    }
    let mut buf = [0u8; 40];
    let mut i = 0u64;
    c.bench_function(&format!("tracker-read-1M/{name}"), |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            s.read(jid(&mut buf, i, false))
        })
    });
    drop(s);
}

fn main() {
    let mut c = Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800))
        .configure_from_args();
    let mut rows = Vec::new();
    let mut mem = Vec::new();
    bench_store("prg-tracker", Tracker::new, &mut c, &mut rows, &mut mem);
    bench_store(
        "rwlock-hashmap",
        StdSharded::new,
        &mut c,
        &mut rows,
        &mut mem,
    );
    bench_store("dashmap(prev)", DashBase::new, &mut c, &mut rows, &mut mem);
    bench_store("papaya", PapayaBase::new, &mut c, &mut rows, &mut mem);
    bench_store(
        "papaya(blocking)",
        PapayaBlocking::new,
        &mut c,
        &mut rows,
        &mut mem,
    );
    c.final_summary();

    println!();
    println!(
        "SUMMARY tracker: {} users, one session each; cells of {CELL_TIME:?}",
        users()
    );
    for r in &rows {
        let ours = rows
            .iter()
            .find(|o| o.store == "prg-tracker" && o.mix == r.mix && o.threads == r.threads)
            .map_or(0.0, |o| o.mops);
        let lat = if r.mix == "churn" {
            String::new()
        } else {
            format!("  read p50 {} ns p99 {} ns", r.p50, r.p99)
        };
        println!(
            "SUMMARY tracker: {:<16} {:<9} {}T {:>7.2} M ops/s  prg/this {:>5.2}x{lat}",
            r.store,
            r.mix,
            r.threads,
            r.mops,
            ours / r.mops
        );
    }
    for (name, per, rss) in &mem {
        println!(
            "SUMMARY tracker: {name:<16} memory {per:>6.0} B/session allocated ({rss:.0} B/session RSS growth)"
        );
    }
    println!("SUMMARY tracker: goals: >= 10 M ops/s at 2 threads on read-98%, read p99 < 1000 ns, <= 256 B/session");
}
