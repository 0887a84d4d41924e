//! The command-line client of the admin API (`prg-proxy status`, …).
//!
//! Exit codes: [`EXIT_OK`] on success, [`EXIT_REFUSED`] when the API
//! refused the request (4xx: unknown node, refused by the state machine,
//! bad or missing token), [`EXIT_UNREACHABLE`] when the API could not be
//! reached or failed (5xx).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The API refused the request (4xx).
pub const EXIT_REFUSED: u8 = 2;
/// The API could not be reached, or answered 5xx.
pub const EXIT_UNREACHABLE: u8 = 3;

/// The default API address.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:20075";

/// One request to the API.
#[derive(Debug, Clone)]
pub enum Request {
    /// `GET /status`.
    Status,
    /// `POST /failover/{node}`.
    Failover(String),
    /// `POST /fallback/{node}`.
    Fallback(String),
    /// `POST /recover`.
    Recover,
    /// `GET /users/{jid}`.
    User(String),
    /// `POST /users`.
    AddUser {
        /// Bare JID.
        jid: String,
        /// Node name or number.
        node: String,
    },
    /// `POST /users/{jid}/move`.
    MoveUser {
        /// Bare JID.
        jid: String,
        /// Node name or number.
        node: String,
    },
}

/// Where and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of the API.
    pub admin: String,
    /// Bearer token for mutating calls.
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    pub json: bool,
}

/// Percent-encodes one path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn node_json(node: &str) -> Value {
    match node.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(node),
    }
}

impl Request {
    fn http(&self) -> (reqwest::Method, String, Option<Value>) {
        use reqwest::Method;
        match self {
            Request::Status => (Method::GET, "/status".into(), None),
            Request::Failover(n) => (Method::POST, format!("/failover/{}", segment(n)), None),
            Request::Fallback(n) => (Method::POST, format!("/fallback/{}", segment(n)), None),
            Request::Recover => (Method::POST, "/recover".into(), None),
            Request::User(j) => (Method::GET, format!("/users/{}", segment(j)), None),
            Request::AddUser { jid, node } => (
                Method::POST,
                "/users".into(),
                Some(json!({ "jid": jid, "node": node_json(node) })),
            ),
            Request::MoveUser { jid, node } => (
                Method::POST,
                format!("/users/{}/move", segment(jid)),
                Some(json!({ "node": node_json(node) })),
            ),
        }
    }
}

/// Sends `req`, prints the answer (standard output) or the error
/// (standard error), and returns the exit code.
pub async fn run(req: &Request, opts: &Options) -> u8 {
    let (method, path, body) = req.http();
    let url = format!("{}{path}", opts.admin.trim_end_matches('/'));
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("prg-proxy: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let mut rb = client.request(method, &url);
    if let Some(t) = &opts.token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("prg-proxy: cannot reach the admin API at {url}: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let status = resp.status();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("prg-proxy: {url}: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        if opts.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            print!("{}", human(req, &value));
        }
        return EXIT_OK;
    }
    let msg = value
        .get("error")
        .and_then(Value::as_str)
        .map_or_else(|| value.to_string(), str::to_string);
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    eprintln!(
        "prg-proxy: {} {}: {msg}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if status.is_client_error() {
        EXIT_REFUSED
    } else {
        EXIT_UNREACHABLE
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, x)| format!("{x:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The status document as a table.
pub fn status_text(st: &Value) -> String {
    let g = &st["group"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group {} ({}): high availability {}, assignment {}",
        s(&g["name"]),
        s(&g["description"]),
        if g["high_availability"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        s(&g["assignment"]),
    );
    let mut rows = vec![[
        "NODE", "NAME", "STATE", "REASON", "SESSIONS", "LOGINS/S", "PACER/S", "ACTIONS",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect::<Vec<_>>()];
    for n in st["nodes"].as_array().into_iter().flatten() {
        let mut actions = Vec::new();
        if n["can_failover"].as_bool() == Some(true) {
            actions.push("failover");
        }
        if n["can_fallback"].as_bool() == Some(true) {
            actions.push("fallback");
        }
        rows.push(vec![
            s(&n["id"]),
            s(&n["name"]),
            s(&n["state_text"]),
            s(&n["reason_text"]),
            s(&n["sessions"]),
            s(&n["logins_per_second"]),
            s(&n["pacer_rate"]),
            if actions.is_empty() {
                "-".into()
            } else {
                actions.join(",")
            },
        ]);
    }
    out.push_str(&table(&rows));
    match g["table_row"].as_u64() {
        Some(r) => {
            let _ = writeln!(out, "Table 2 row {r}: {}", s(&g["recommended_action"]));
        }
        None => {
            let _ = writeln!(out, "{}", s(&g["recommended_action"]));
        }
    }
    if g["can_recover"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "both nodes are failed: `prg-proxy recover` is possible"
        );
    }
    let _ = writeln!(
        out,
        "users online {}, pending re-login slots {}, hints issued {}, moves recorded {}",
        s(&st["users_online"]),
        s(&st["pacer"]["pending_relogin_slots"]),
        s(&st["hints_issued"]),
        st["moves"].as_array().map_or(0, Vec::len),
    );
    out
}

fn human(req: &Request, v: &Value) -> String {
    match req {
        Request::Status => status_text(v),
        Request::Failover(n) => format!("failover of {n} accepted\n{}", status_text(&v["status"])),
        Request::Fallback(n) => format!("fallback to {n} accepted\n{}", status_text(&v["status"])),
        Request::Recover => format!("recovery accepted\n{}", status_text(&v["status"])),
        Request::User(_) => {
            let mut out = format!(
                "{}: home {} (node {}), {} session(s)\n",
                s(&v["jid"]),
                s(&v["home_name"]),
                s(&v["home"]),
                v["sessions"].as_array().map_or(0, Vec::len)
            );
            let mut rows = vec![vec!["RESOURCE".into(), "NODE".into(), "PRESENCE".into()]];
            for x in v["sessions"].as_array().into_iter().flatten() {
                let p = &x["presence"];
                let presence = if p["available"].as_bool() == Some(true) {
                    format!("{} (priority {})", s(&p["show"]), s(&p["priority"]))
                } else {
                    "unavailable".into()
                };
                rows.push(vec![s(&x["resource"]), s(&x["node_name"]), presence]);
            }
            if rows.len() > 1 {
                out.push_str(&table(&rows));
            }
            out
        }
        Request::AddUser { .. } => format!(
            "{} added: home {} (node {})\n",
            s(&v["jid"]),
            s(&v["home_name"]),
            s(&v["home"])
        ),
        Request::MoveUser { .. } => format!(
            "{} moved: home {} (node {}), {} stream(s) closed with a re-login hint\n",
            s(&v["jid"]),
            s(&v["home_name"]),
            s(&v["home"]),
            s(&v["evicted"])
        ),
    }
}
