//! The routes: JSON in and out, errors as `{"error": "..."}`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::sampler::Sampler;
use crate::control::Eviction;
use crate::failover::Why;
use crate::group::{AdminError, NodeState};
use crate::node::NodeId;
use crate::view::{AddUserError, ProxyView};

/// The status page: one self-contained HTML file.
const PAGE: &str = include_str!("page.html");

/// What every route reads.
pub(super) struct AdminState {
    pub(super) view: ProxyView,
    pub(super) sampler: Arc<Sampler>,
    pub(super) token: Option<String>,
}

type St = State<Arc<AdminState>>;

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let status = match &e {
            AdminError::Rejected(_) => StatusCode::CONFLICT,
            AdminError::NoSuchNode(_) => StatusCode::NOT_FOUND,
            AdminError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<AddUserError> for ApiError {
    fn from(e: AddUserError) -> ApiError {
        let status = match &e {
            AddUserError::DuringFailover(_) => StatusCode::CONFLICT,
            AddUserError::Assignment(crate::route::AddUserError::ActiveStandby) => {
                StatusCode::CONFLICT
            }
            AddUserError::Assignment(crate::route::AddUserError::NoSuchNode(_)) => {
                StatusCode::NOT_FOUND
            }
            AddUserError::Jid(_) => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

pub(super) fn router(state: Arc<AdminState>) -> Router {
    let mutating = Router::new()
        .route("/failover/{node}", post(failover))
        .route("/fallback/{node}", post(fallback))
        .route("/recover", post(recover))
        .route("/reload", post(reload))
        .route("/users", post(add_user))
        .route("/users/{jid}/move", post(move_user))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/users/{jid}", get(user))
        .merge(mutating)
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
}

/// Equal in time independent of where the inputs differ (and of their
/// lengths: both sides are hashed first).
fn same_token(given: &str, token: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn authorize(State(st): St, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this call needs `Authorization: Bearer TOKEN` (admin.token)",
                )
                .into_response()
            }
            Some(g) if !same_token(g, token) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "wrong token").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

async fn page() -> Response {
    let mut r = Html(PAGE).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn number(n: NodeId) -> usize {
    n.index() + 1
}

fn node_name(view: &ProxyView, n: NodeId) -> String {
    view.config
        .nodes
        .get(n.index())
        .map_or_else(|| n.to_string(), |c| c.name.clone())
}

/// A node by its configured name or by `1` / `2`.
fn parse_node(view: &ProxyView, s: &str) -> Result<NodeId, ApiError> {
    let id = match s {
        "1" => Some(NodeId::Node1),
        "2" => Some(NodeId::Node2),
        _ => view.node_named(s),
    };
    match id {
        Some(n) if n.index() < view.config.nodes.len() => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "group {} has no node {s:?}; name a node ({}) or use its number",
                view.config.group.name,
                view.config
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn node_value(view: &ProxyView, v: &Value) -> Result<NodeId, ApiError> {
    match v {
        Value::String(s) => parse_node(view, s),
        Value::Number(n) => parse_node(view, &n.to_string()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`node` must be a node's name or number",
        )),
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

fn normalize(jid: &str) -> Result<String, ApiError> {
    crate::jid::normalize_bare(jid)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

/// The whole status document (`GET /status`).
pub(super) fn status_json(st: &AdminState) -> Value {
    let v = &st.view;
    let g = v.group.current();
    let pacer = v.hints.pacer();
    let present: Vec<NodeId> = NodeId::ALL
        .into_iter()
        .filter(|n| g.nodes[n.index()].name.is_some())
        .collect();
    let nodes: Vec<Value> = present
        .iter()
        .map(|&id| {
            let n = &g.nodes[id.index()];
            let serves: Vec<usize> = NodeId::ALL
                .into_iter()
                .filter(|h| g.serving[h.index()] == Some(id))
                .map(number)
                .collect();
            json!({
                "id": number(id),
                "name": n.name,
                "state": n.state,
                "state_text": n.state.to_string(),
                "reason": n.reason,
                "reason_text": n.reason.to_string(),
                "recommended_action": g.recommended_action,
                "can_failover": n.state == NodeState::Normal,
                "can_fallback": matches!(n.state, NodeState::Idle | NodeState::FailedOver),
                "serves_users_of": serves,
                "sessions": v.tracker.count_on(id),
                "logins_per_second": st.sampler.logins_per_second(id),
                "pacer_rate": pacer.rate(id),
                "waiting_logins": pacer.waiting(id),
                "last_heartbeat_error": n.last_heartbeat_error,
                "services_down": n.services_down,
            })
        })
        .collect();
    let can_recover =
        present.len() == 2 && present.iter().all(|n| g.nodes[n.index()].state.is_failed());
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "group": {
            "name": g.group,
            "description": v.config.group.description,
            "high_availability": g.high_availability,
            "assignment": v.config.group.assignment,
            "table_row": g.table_row,
            "recommended_action": g.recommended_action,
            "monitoring": g.monitoring,
            "can_add_users": g.can_add_users,
            "can_recover": can_recover,
            "move_in_progress": g.move_in_progress.map(number),
        },
        "nodes": nodes,
        "users_online": v.tracker.user_count(),
        "connections_active": load(&v.metrics.connections_active),
        "hints_issued": load(&v.hints.stats.issued),
        "pacer": {
            "pending_relogin_slots": pacer.pending_slots(),
            "admitted": load(&pacer.stats.admitted),
            "held": load(&pacer.stats.held),
            "refused": load(&pacer.stats.refused),
        },
        "moves": st.sampler.moves(),
    })
}

/// The counters in the Prometheus text format.
async fn metrics(State(st): St) -> Response {
    (
        [(header::CONTENT_TYPE, crate::prometheus::CONTENT_TYPE)],
        crate::prometheus::render(&st.view),
    )
        .into_response()
}

async fn status(State(st): St) -> Json<Value> {
    Json(status_json(&st))
}

fn done(st: &AdminState) -> ApiResult {
    Ok(Json(json!({ "ok": true, "status": status_json(st) })))
}

async fn failover(State(st): St, Path(node): Path<String>) -> ApiResult {
    let n = parse_node(&st.view, &node)?;
    st.view.group.failover(n).await?;
    done(&st)
}

async fn fallback(State(st): St, Path(node): Path<String>) -> ApiResult {
    let n = parse_node(&st.view, &node)?;
    st.view.group.fallback(n).await?;
    done(&st)
}

async fn recover(State(st): St) -> ApiResult {
    st.view.group.recovery().await?;
    done(&st)
}

/// Re-reads the configuration file (as SIGHUP does): 200 with what was
/// applied and what needs a restart, 400 naming the key if the file is bad
/// (the running configuration stays), 409 when the proxy was not started
/// from a file.
async fn reload(State(st): St) -> ApiResult {
    if st.view.config_path().is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the proxy was not started from a configuration file",
        ));
    }
    match st.view.reload() {
        Ok(r) => Ok(Json(json!({
            "ok": true,
            "applied": r.applied,
            "needs_restart": r.needs_restart,
        }))),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{}: {}", e.key, e.message),
        )),
    }
}

async fn user(State(st): St, Path(jid): Path<String>) -> ApiResult {
    let v = &st.view;
    let bare = normalize(&jid)?;
    let home = v.assignment.home(&bare).ok();
    let tracked = v.tracker.lookup(&bare);
    let sessions: Vec<Value> = tracked
        .as_ref()
        .map(|u| {
            u.sessions
                .iter()
                .map(|s| {
                    let resource = s.full_jid.split_once('/').map_or("", |(_, r)| r);
                    let p = &s.presence;
                    json!({
                        "resource": resource,
                        "full_jid": &*s.full_jid,
                        "node": number(s.node),
                        "node_name": node_name(v, s.node),
                        "presence": {
                            "available": p.available,
                            "show": format!("{:?}", p.show).to_ascii_lowercase(),
                            "priority": p.priority,
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(json!({
        "jid": bare,
        "home": home.map(number),
        "home_name": home.map(|h| node_name(v, h)),
        "serving": tracked.as_ref().map(|u| number(u.serving)),
        "sessions": sessions,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddUser {
    jid: String,
    node: Value,
}

async fn add_user(State(st): St, body: Bytes) -> ApiResult {
    let req: AddUser = parse_body(&body)?;
    let n = node_value(&st.view, &req.node)?;
    let bare = normalize(&req.jid)?;
    st.view.add_user(&bare, n)?;
    Ok(Json(json!({
        "ok": true,
        "jid": bare,
        "home": number(n),
        "home_name": node_name(&st.view, n),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveUser {
    node: Value,
}

/// Pins the user's home to the node and closes the user's streams that
/// are not on the node serving that home now, each with a re-login hint.
async fn move_user(State(st): St, Path(jid): Path<String>, body: Bytes) -> ApiResult {
    let req: MoveUser = parse_body(&body)?;
    let v = &st.view;
    let target = node_value(v, &req.node)?;
    let bare = normalize(&jid)?;
    v.group
        .can_add_users()
        .map_err(|e| ApiError::from(AddUserError::from(e)))?;
    v.assignment
        .add(&bare, target)
        .map_err(|e| ApiError::from(AddUserError::from(e)))?;
    let serving = v.group.current().serving[target.index()];
    let sessions = v
        .tracker
        .lookup(&bare)
        .map(|u| u.sessions)
        .unwrap_or_default();
    let leaving: Vec<_> = sessions
        .into_iter()
        .filter(|s| Some(s.node) != serving)
        .collect();
    let from = leaving.first().map(|s| s.node);
    let mut evicted = 0u64;
    if !leaving.is_empty() {
        let hints = v
            .hints
            .plan_move(std::slice::from_ref(&bare), serving, target, Why::Move);
        if let Some(hint) = hints.first() {
            let text = format!(
                "user {bare} moves to node {} on the administrator's request",
                node_name(v, target)
            );
            let xml = v.hints.eviction(hint, "system-shutdown", &text);
            for s in &leaving {
                if s.handle.evict(Eviction {
                    xml: xml.clone(),
                    done: None,
                }) {
                    evicted += 1;
                }
            }
        }
        st.sampler
            .record(v, target, from, serving, Why::Move, evicted);
    }
    tracing::info!(user = %bare, node = %node_name(v, target), evicted, "user moved by the administrator");
    Ok(Json(json!({
        "ok": true,
        "jid": bare,
        "home": number(target),
        "home_name": node_name(v, target),
        "evicted": evicted,
    })))
}
