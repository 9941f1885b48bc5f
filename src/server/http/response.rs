//! The answers: Acks, plain-text responses, and the admin endpoints (health, readiness, metrics,
//! drain; `POST /drain` only on an admin listener of its own).

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header as h};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::bits::protocol::{Ack, BITS_POST};
use crate::bits::request;
use crate::server::state::AppState;

/// The body of every response, boxed: text, an empty Ack, a file, or another member's answer.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// 405, naming the one method the upload side takes.
pub fn not_allowed(why: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, why);
    r.headers_mut()
        .insert(h::ALLOW, HeaderValue::from_static(BITS_POST));
    r
}

/// Every answer to a BITS packet, errors included: an Ack with an empty body.
pub fn ack_response(ack: Ack, keep_alive: bool) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(ack.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let hm = r.headers_mut();
    hm.insert("bits-packet-type", HeaderValue::from_static("Ack"));
    hm.insert(h::CONTENT_LENGTH, HeaderValue::from_static("0"));
    hm.insert(h::PRAGMA, HeaderValue::from_static("no-cache"));
    for (name, value) in ack.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            hm.append(name, v);
        }
    }
    if !keep_alive {
        hm.insert(h::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The admin endpoint a request is for, answered; `None` when it is for none of them.
/// `admin_listener`: the request came in on an admin listener of its own.
pub fn admin<B>(
    state: &AppState,
    admin_listener: bool,
    req: &Request<B>,
) -> Option<Response<Body>> {
    if request::is_get_or_head(req.method()) {
        return match req.uri().path() {
            "/healthz" => Some(text(StatusCode::OK, "ok\n")),
            "/readyz" => Some(readiness(state)),
            // Reading how many sessions a drain still waits for changes nothing, and says no more
            // than `/readyz` and `/metrics` beside it; it also follows a SIGUSR1 drain of a
            // server without an admin address.
            "/drain" => Some(drain_status(state)),
            "/metrics" => Some(metrics(state)),
            _ => None,
        };
    }
    // Draining takes the server out of service: it is an operator's switch, offered only on an
    // admin listener of its own. On the upload (or a farm's shared) address any client could
    // stop the server with one request, authentication or not; without an admin address there
    // is SIGUSR1 (`bitsfarm drain --pid`).
    if admin_listener && req.method() == Method::POST && req.uri().path() == "/drain" {
        return Some(drain(state, req.uri().query().unwrap_or("")));
    }
    None
}

fn readiness(state: &AppState) -> Response<Body> {
    if state.drain.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if state.ready.load(std::sync::atomic::Ordering::Relaxed) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
}

fn metrics(state: &AppState) -> Response<Body> {
    let mut r = text(StatusCode::OK, state.metrics.encode());
    r.headers_mut().insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// `POST /drain`: `?stay=true` (the operator's scale-down) drains but keeps the server running
/// once empty; `?cancel=true` (the farm grew back before this server was removed) ends the drain.
fn drain(state: &AppState, query: &str) -> Response<Body> {
    if query_flag(query, "cancel") {
        if state.cancel_drain().is_err() {
            return text(
                StatusCode::CONFLICT,
                "this server is stopping (signalled); its drain cannot be cancelled\n",
            );
        }
        return drain_status(state);
    }
    state.start_drain(query_flag(query, "stay"));
    drain_status(state)
}

/// `{"draining": true, "sessions": N}`: how many sessions a draining server still waits for.
fn drain_status(state: &AppState) -> Response<Body> {
    let mut r = text(
        StatusCode::OK,
        format!(
            "{{\"draining\":{},\"sessions\":{}}}\n",
            state.drain.is_draining(),
            state.open_sessions()
        ),
    );
    r.headers_mut().insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether a query string sets `name` (`name=true` or `name=1`).
fn query_flag(query: &str, name: &str) -> bool {
    query.split('&').any(|kv| {
        kv.strip_prefix(name)
            .and_then(|v| v.strip_prefix('='))
            .is_some_and(|v| v == "true" || v == "1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_flag_is_true_or_1_and_nothing_else() {
        assert!(query_flag("stay=true", "stay"));
        assert!(query_flag("x=2&stay=1", "stay"));
        assert!(!query_flag("stay=false", "stay"));
        assert!(!query_flag("stay", "stay"));
        assert!(!query_flag("stayed=true", "stay"));
        assert!(!query_flag("cancel=true", "stay"));
        assert!(!query_flag("", "stay"));
    }

    #[test]
    fn an_ack_is_an_empty_response_carrying_its_headers() {
        let ack = Ack::ok().with("bits-session-id", "{X}");
        let r = ack_response(ack.clone(), true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["bits-packet-type"], "Ack");
        assert_eq!(r.headers()[h::CONTENT_LENGTH], "0");
        assert_eq!(r.headers()["bits-session-id"], "{X}");
        assert!(!r.headers().contains_key(h::CONNECTION));
        let closing = ack_response(ack, false);
        assert_eq!(closing.headers()[h::CONNECTION], "close");
    }
}
