//! A mocked API server for reconcile tests (the controller-rs `fixtures.rs` pattern): each test
//! states the exact sequence of requests it expects and answers them.

use std::sync::Arc;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

use super::controller::Context;
use super::metrics::Metrics;
use super::resources::BuildOptions;

pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request as the mock saw it.
#[derive(Debug)]
pub struct Seen {
    pub query: String,
    pub body: Value,
}

pub fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let build = BuildOptions {
        default_image: "bitsfarm:test".into(),
        pvc_retention_policy: false,
    };
    let ctx = Context::new(client, build, Arc::new(Metrics::default()));
    (Arc::new(ctx), ApiServer { handle })
}

impl ApiServer {
    /// Waits for the next request, checks its method and path, and answers `status` with the
    /// body `respond` makes from the request body.
    pub async fn expect(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        respond: impl FnOnce(&Value) -> Value,
    ) -> Seen {
        let (request, send) = self
            .handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but no request came"));
        let seen_method = request.method().to_string();
        let uri = request.uri().clone();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        assert_eq!(
            (seen_method.as_str(), uri.path()),
            (method, path),
            "unexpected request {seen_method} {uri}"
        );
        let answer = respond(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        Seen {
            query: uri.query().unwrap_or("").to_string(),
            body,
        }
    }

    /// A server-side apply of the operator's, answered with the applied object.
    pub async fn expect_apply(&mut self, path: &str) -> Seen {
        let seen = self.expect("PATCH", path, 200, |b| b.clone()).await;
        assert!(
            seen.query.contains("fieldManager=bitsfarm-operator")
                && seen.query.contains("force=true"),
            "not an SSA with the operator's field manager: {}",
            seen.query
        );
        seen
    }

    /// Asserts that no request is left.
    pub async fn done(mut self) {
        let next = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            self.handle.next_request(),
        )
        .await;
        if let Ok(Some((r, _))) = next {
            panic!("unexpected extra request {} {}", r.method(), r.uri());
        }
    }
}

pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message, "metadata": {}})
}
