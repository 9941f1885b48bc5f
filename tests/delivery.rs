//! Delivery of finished uploads to the server application (issue 3): notifications by value and
//! by reference, the backend's answers and failures, upload-reply, the delivery record and ledger,
//! and crashes (SIGKILL) in every window of a delivery.
//!
//! Backends: the real `bitsfarm receiver`, and a scripted one (a std TcpListener thread in the test)
//! that records every request and answers, fails or stalls as the test says.

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use sha2::{Digest, Sha256};

const FRAG: usize = 64 * 1024;
/// Several fragments, the last one short.
const SIZE: usize = 5 * FRAG + 4321;
const PAUSE_ENV: &str = "BITSFARM_TEST_PAUSE_AT";
const NOTIFICATION_TIMEOUT: &str = "0x80070112";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The Idempotency-Key the design documents: `bf1-` + the first 16 bytes (hex) of SHA-256 over a
/// version tag, the upload's path and query, and the SHA-256 of its content. Every member of a farm
/// computes the same one, so a test can too.
fn expected_key(path_and_query: &str, data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"bitsfarm-delivery-v1\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(Sha256::digest(data));
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("bf1-{hex}")
}

fn expected_digest(data: &[u8]) -> String {
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
    )
}

/// Where the final fragment starts.
fn last_start(data: &[u8]) -> usize {
    (data.len() - 1) / FRAG * FRAG
}

/// Creates a session and sends every fragment but the last with the real total.
fn start_upload(s: &Server, path: &str, data: &[u8]) -> String {
    let id = s.create_session(path);
    let last = last_start(data);
    let total = data.len() as u64;
    let mut at = 0;
    while at < last {
        let end = (at + FRAG).min(last);
        let r = s.fragment(&id, path, at as u64, &data[at..end], total);
        assert_eq!(r.status, 200, "fragment {at}-{}: {r:?}", end - 1);
        assert_eq!(r.received(), Some(end as u64), "fragment {at}: Ack offset");
        at = end;
    }
    id
}

/// The final fragment (sent again on every retry: same range, same bytes).
fn final_fragment_request(id: &str, path: &str, data: &[u8]) -> Request {
    let last = last_start(data);
    fragment_request(id, path, last as u64, &data[last..], data.len() as u64)
}

fn final_fragment(s: &Server, id: &str, path: &str, data: &[u8]) -> Response {
    s.send(&final_fragment_request(id, path, data))
}

/// Asserts a successful final-fragment Ack and returns its BITS-Reply-URL.
#[track_caller]
fn assert_final_ok(r: &Response, data: &[u8], what: &str) -> String {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert_ack_shape(r, what);
    assert_eq!(
        r.received(),
        Some(data.len() as u64),
        "{what}: Ack offset: {r:?}"
    );
    r.header("BITS-Reply-URL")
        .unwrap_or_else(|| panic!("{what}: final Ack without BITS-Reply-URL: {r:?}"))
        .to_string()
}

/// Asserts an error Ack from the server application: `status`, `code`, context 0x7.
#[track_caller]
fn assert_app_error(r: &Response, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_ack_shape(r, what);
    assert_eq!(r.error_code(), Some(code), "{what}: BITS-Error-Code: {r:?}");
    assert_eq!(
        r.header("BITS-Error-Context"),
        Some("0x7"),
        "{what}: BITS-Error-Context: {r:?}"
    );
    assert!(
        r.header("BITS-Reply-URL").is_none(),
        "{what}: a failed delivery has no reply URL: {r:?}"
    );
}

/// GET (or HEAD) of a reply URL this server gave (an absolute path on it).
fn fetch(s: &Server, method: &str, reply_url: &str, range: Option<&str>) -> Response {
    assert!(
        reply_url.starts_with('/'),
        "reply URL {reply_url:?} is not a path on this server"
    );
    let mut req = Request::new(method, reply_url);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    s.send(&req)
}

fn by_value(url: &str) -> Vec<String> {
    vec![
        "--notify-type".into(),
        "by-value".into(),
        "--notify-url".into(),
        url.into(),
    ]
}

fn by_reference(url: &str) -> Vec<String> {
    vec![
        "--notify-type".into(),
        "by-reference".into(),
        "--notify-url".into(),
        url.into(),
    ]
}

fn start(args: &[String]) -> Server {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&a)
}

/// A scripted backend that answers every request 200 with `body`.
fn always_ok(body: &'static [u8]) -> Backend {
    Backend::start(move |_, _| Answer::ok(body))
}

// ---------------------------------------------------------------------------------------------
// With the real receiver
// ---------------------------------------------------------------------------------------------

/// A data folder for the server a test starts next, and a receiver that trusts it: by reference,
/// the server names its files there, and the receiver reads and writes nowhere else.
fn trusting_receiver() -> (ReceiverProcess, tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("bitsfarm-it-")
        .tempdir()
        .expect("creating a temporary data root");
    let data_dir = root.path().join("data");
    std::fs::create_dir(&data_dir).expect("creating the data folder");
    let receiver = ReceiverProcess::start_trusting(&[&data_dir]);
    (receiver, root, data_dir)
}

fn deliver_to_receiver(by_ref: bool) {
    let (receiver, _root, data_dir) = trusting_receiver();
    let url = receiver.url("/deliver");
    let args = if by_ref {
        by_reference(&url)
    } else {
        by_value(&url)
    };
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start_at(&data_dir, &a);
    let data = random_bytes(SIZE, if by_ref { 0xBEEF } else { 0xF00D });
    let path = "/in/report.bin";
    let id = start_upload(&s, path, &data);
    assert!(
        receiver.deliveries().is_empty(),
        "nothing is delivered before the last byte"
    );
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");

    let stored = receiver.deliveries();
    assert_eq!(stored.len(), 1, "the receiver holds one copy: {stored:?}");
    let d = &stored[0];
    assert_eq!(d.content_sha256, sha256_hex(&data), "the copy's SHA-256");
    assert_eq!(d.key, expected_key(path, &data), "stored under its key");
    assert_eq!(d.record["session-id"].as_str(), Some(id.as_str()));
    assert_eq!(
        d.record["original-url"].as_str(),
        Some(format!("http://{}{path}", s.addr).as_str())
    );
    assert_eq!(receiver.metric("bitsfarm_receiver_deliveries_total"), 1.0);
    assert_eq!(
        receiver.metric("bitsfarm_receiver_duplicates_suppressed_total"),
        0.0
    );

    // The reply the client downloads is the receiver's.
    let r = fetch(&s, "GET", &reply_url, None);
    assert_eq!(r.status, 200, "GET reply: {r:?}");
    assert_eq!(r.text(), d.reply(), "the reply is the receiver's");
    assert!(!d.reply().is_empty());

    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close: {r:?}");
    assert!(
        !s.data_dir.join("in/report.bin").exists(),
        "without BITS-Copy-File-To-Destination the upload is not put at its destination"
    );
    assert_eq!(fetch(&s, "GET", &reply_url, None).status, 404);
    assert_eq!(receiver.deliveries().len(), 1, "still one copy after Close");
    assert_eq!(s.metric("bitsfarm_notifications_total"), 1.0);
}

#[test]
fn by_value_delivers_one_copy_to_the_receiver() {
    deliver_to_receiver(false);
}

#[test]
fn by_reference_delivers_one_copy_to_the_receiver() {
    deliver_to_receiver(true);
}

// ---------------------------------------------------------------------------------------------
// What a notification carries
// ---------------------------------------------------------------------------------------------

#[test]
fn by_value_notification_headers_and_body() {
    let backend = always_ok(b"thanks\n");
    let s = start(&by_value(&backend.url("/app/in?k=1")));
    let data = random_bytes(SIZE, 1);
    let (path, query) = ("/up/a.bin", "?acct=7");
    let target = format!("{path}{query}");
    let id = start_upload(&s, path, &data);
    let reply_url = assert_final_ok(&final_fragment(&s, &id, &target, &data), &data, "final");

    let reqs = backend.requests();
    assert_eq!(reqs.len(), 1, "one notification: {reqs:?}");
    let n = &reqs[0];
    assert_eq!(n.method, "POST");
    assert_eq!(
        n.target, "/app/in?k=1&acct=7",
        "the upload URL's query is appended to the notify URL"
    );
    assert_eq!(n.header("BITS-Session-Id"), Some(id.as_str()));
    assert_eq!(
        n.header("Idempotency-Key"),
        Some(expected_key(&target, &data).as_str())
    );
    assert_eq!(
        n.header("Repr-Digest"),
        Some(expected_digest(&data).as_str())
    );
    assert_eq!(
        n.header("BITS-Original-Request-URL"),
        Some(format!("http://{}{target}", s.addr).as_str())
    );
    assert_eq!(
        n.header("Content-Length"),
        Some(data.len().to_string().as_str())
    );
    assert!(n.header("BITS-Request-DataFile-Name").is_none());
    assert!(n.header("BITS-Response-DataFile-Name").is_none());
    assert_eq!(n.body.len(), data.len());
    assert!(n.body == data, "the body is the uploaded file");

    let r = fetch(&s, "GET", &reply_url, None);
    assert_eq!((r.status, r.text().as_str()), (200, "thanks\n"), "{r:?}");
}

#[test]
fn by_reference_notification_names_the_files_and_serves_the_backends_reply() {
    let seen: Arc<Mutex<Option<String>>> = Arc::default();
    let seen2 = seen.clone();
    let reply = random_bytes(3000, 77);
    let reply2 = reply.clone();
    let backend = Backend::start(move |_, req| {
        // The backend shares the volume: it reads the upload and writes its reply in place.
        let data = req.header("BITS-Request-DataFile-Name").map(std::fs::read);
        *seen2.lock().unwrap() = match data {
            Some(Ok(d)) => Some(sha256_hex(&d)),
            Some(Err(e)) => Some(format!("unreadable: {e}")),
            None => None,
        };
        if let Some(out) = req.header("BITS-Response-DataFile-Name") {
            std::fs::write(out, &reply2).expect("writing the reply file");
        }
        Answer::ok(b"")
    });
    let s = start(&by_reference(&backend.url("/app/ref")));
    let data = random_bytes(SIZE, 2);
    let path = "/up/ref.bin";
    let id = start_upload(&s, path, &data);
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");

    let reqs = backend.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let n = &reqs[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.target, "/app/ref");
    assert_eq!(n.header("Content-Length"), Some("0"));
    assert!(n.body.is_empty());
    assert_eq!(n.header("BITS-Session-Id"), Some(id.as_str()));
    assert_eq!(
        n.header("Idempotency-Key"),
        Some(expected_key(path, &data).as_str())
    );
    assert_eq!(
        n.header("Repr-Digest"),
        Some(expected_digest(&data).as_str())
    );
    assert_eq!(
        n.header("BITS-Original-Request-URL"),
        Some(format!("http://{}{path}", s.addr).as_str())
    );
    let req_file = n.header("BITS-Request-DataFile-Name").unwrap();
    let resp_file = n.header("BITS-Response-DataFile-Name").unwrap();
    assert!(req_file.starts_with('/') && resp_file.starts_with('/'));
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some(sha256_hex(&data).as_str()),
        "the request data file held the whole upload when the backend was notified"
    );

    let r = fetch(&s, "GET", &reply_url, None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body == reply,
        "the served reply is the file the backend wrote"
    );
    let r = fetch(&s, "GET", &reply_url, Some("bytes=100-199"));
    assert_eq!(r.status, 206, "{r:?}");
    assert!(r.body == reply[100..200]);
}

#[test]
fn relative_notify_urls_resolve_against_the_upload_url() {
    // The upload URL's host is what the client used (the Host header); a relative notify URL
    // resolves against it, as with IIS where the application lives on the same site. Here the
    // client names the backend's address as its Host so the resolved URL reaches the backend.
    let cases = [
        ("handler.app", "/up/dir/handler.app?x=1"),
        ("/app/in", "/app/in?x=1"),
        ("../hooks/h?mode=a", "/up/hooks/h?mode=a&x=1"),
    ];
    for (notify, expected_target) in cases {
        let backend = always_ok(b"ok");
        let s = Server::start(&["--notify-type", "by-value", "--notify-url", notify]);
        let host = backend.addr.to_string();
        let data = random_bytes(2 * FRAG + 10, 3);
        let (path, target) = ("/up/dir/a.bin", "/up/dir/a.bin?x=1");
        let r = s.send(&create_request(path).header("Host", &host));
        assert_eq!(r.status, 200, "{r:?}");
        let id = r.header("BITS-Session-Id").unwrap().to_string();
        let total = data.len() as u64;
        let mut at = 0;
        let mut last = None;
        while at < data.len() {
            let end = (at + FRAG).min(data.len());
            let t = if end == data.len() { target } else { path };
            let r = s.send(
                &fragment_request(&id, t, at as u64, &data[at..end], total).header("Host", &host),
            );
            assert_eq!(r.status, 200, "{notify}: fragment {at}: {r:?}");
            last = Some(r);
            at = end;
        }
        assert_final_ok(&last.unwrap(), &data, notify);
        let reqs = backend.requests();
        assert_eq!(reqs.len(), 1, "{notify}: {reqs:?}");
        assert_eq!(reqs[0].target, expected_target, "{notify} resolved");
        assert_eq!(
            reqs[0].header("BITS-Original-Request-URL"),
            Some(format!("http://{host}{target}").as_str())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Failures and retries
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_errors_are_relayed_and_the_retry_delivers_with_the_same_key() {
    let backend = Backend::start(|i, _| match i {
        0 => Answer::status(500, b"boom"),
        1 => Answer::status(403, b"go away"),
        _ => Answer::ok(b"finally\n"),
    });
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 4);
    let path = "/up/err.bin";
    let id = start_upload(&s, path, &data);

    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 500, "0x801901F4", "backend 500");
    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 403, "0x80190193", "backend 403");
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");

    let reqs = backend.requests();
    assert_eq!(reqs.len(), 3, "each retry delivered again: {reqs:?}");
    let key = expected_key(path, &data);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.header("Idempotency-Key"), Some(key.as_str()), "try {i}");
        assert_eq!(r.header("BITS-Session-Id"), Some(id.as_str()), "try {i}");
        assert!(r.body == data, "try {i}: the whole file every time");
    }
    assert_eq!(fetch(&s, "GET", &reply_url, None).text(), "finally\n");
    // Nothing more is sent once the delivery succeeded.
    assert_eq!(s.close(&id, path).status, 200);
    assert_eq!(backend.count(), 3);
}

#[test]
fn a_stalled_backend_times_out_with_408_and_the_retry_delivers() {
    let backend = Backend::start(|i, _| match i {
        0 => Answer::Stall(Duration::from_secs(20)),
        _ => Answer::ok(b"late but fine\n"),
    });
    let mut args = by_value(&backend.url("/slow"));
    args.extend(["--notify-timeout".to_string(), "1".to_string()]);
    let s = start(&args);
    let data = random_bytes(SIZE, 5);
    let path = "/up/slow.bin";
    let id = start_upload(&s, path, &data);

    let t = Instant::now();
    let r = final_fragment(&s, &id, path, &data);
    let took = t.elapsed();
    assert_app_error(&r, 408, NOTIFICATION_TIMEOUT, "stalled backend");
    assert!(
        took < Duration::from_secs(10),
        "the notify timeout of 1 s was not applied: {took:?}"
    );
    assert_eq!(
        backend.count(),
        1,
        "the stalled backend got the notification"
    );

    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(
        reqs[0].header("Idempotency-Key"),
        reqs[1].header("Idempotency-Key"),
        "the retry uses the same key"
    );
    assert_eq!(
        reqs[1].header("Idempotency-Key"),
        Some(expected_key(path, &data).as_str())
    );
    assert_eq!(fetch(&s, "GET", &reply_url, None).text(), "late but fine\n");
}

#[test]
fn an_unreachable_backend_gives_408_and_the_retry_delivers() {
    // A port nobody listens on: bind, note it, let it go.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = start(&by_value(&format!("http://{addr}/down")));
    let data = random_bytes(SIZE, 6);
    let path = "/up/down.bin";
    let id = start_upload(&s, path, &data);

    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 408, NOTIFICATION_TIMEOUT, "connection refused");
    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 408, NOTIFICATION_TIMEOUT, "still refused");

    // The application comes up on that port; the client's next retry delivers.
    let backend = Backend::start_on(addr, |_, _| Answer::ok(b"up again\n"));
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0].header("Idempotency-Key"),
        Some(expected_key(path, &data).as_str())
    );
    assert!(reqs[0].body == data);
    assert_eq!(fetch(&s, "GET", &reply_url, None).text(), "up again\n");
}

#[test]
fn close_after_a_failed_delivery_tries_again() {
    let backend = Backend::start(|i, _| match i {
        0 => Answer::status(503, b"busy"),
        _ => Answer::ok(b"ok\n"),
    });
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 7);
    let path = "/up/close.bin";
    let id = start_upload(&s, path, &data);
    assert_app_error(
        &final_fragment(&s, &id, path, &data),
        503,
        "0x801901F7",
        "503",
    );
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close delivers: {r:?}");
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].header("Idempotency-Key"),
        reqs[1].header("Idempotency-Key")
    );
    assert_eq!(s.close(&id, path).status, 200, "a retried Close");
    assert_eq!(backend.count(), 2, "a retried Close does not notify again");
}

// ---------------------------------------------------------------------------------------------
// Upload-reply
// ---------------------------------------------------------------------------------------------

#[test]
fn the_reply_is_served_with_ranges_and_head_until_close() {
    let reply = random_bytes(1000, 8);
    let reply2 = reply.clone();
    let backend = Backend::start(move |_, _| Answer::ok(&reply2));
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 9);
    let path = "/up/reply.bin";
    let id = start_upload(&s, path, &data);
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");
    assert!(
        reply_url.contains("BITS-Sessions/Replies/") && reply_url.ends_with("/responsefile.bin"),
        "reply URL {reply_url:?}"
    );

    let r = fetch(&s, "GET", &reply_url, Some("bytes=0-9"));
    assert_eq!(r.status, 206, "{r:?}");
    assert!(r.body == reply[..10], "the first ten bytes: {r:?}");
    assert_eq!(r.header("Content-Range"), Some("bytes 0-9/1000"));
    let r = fetch(&s, "GET", &reply_url, Some("bytes=990-"));
    assert_eq!(r.status, 206, "{r:?}");
    assert!(r.body == reply[990..]);

    let r = fetch(&s, "HEAD", &reply_url, None);
    assert_eq!(r.status, 200, "HEAD: {r:?}");
    assert_eq!(r.header("Content-Length"), Some("1000"));
    assert!(r.body.is_empty());

    let r = fetch(&s, "GET", &reply_url, None);
    assert_eq!(r.status, 200);
    assert!(r.body == reply, "the full reply is the backend's body");

    assert_eq!(s.close(&id, path).status, 200);
    assert_eq!(
        fetch(&s, "GET", &reply_url, None).status,
        404,
        "after Close"
    );
    assert_eq!(
        fetch(&s, "HEAD", &reply_url, None).status,
        404,
        "after Close"
    );
    assert_eq!(
        fetch(&s, "GET", &reply_url, Some("bytes=0-9")).status,
        404,
        "after Close"
    );
}

#[test]
fn the_reply_is_gone_after_cancel() {
    let backend = always_ok(b"reply to be cancelled\n");
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 10);
    let path = "/up/cancel.bin";
    let id = start_upload(&s, path, &data);
    let reply_url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");
    assert_eq!(fetch(&s, "GET", &reply_url, None).status, 200);
    assert_eq!(s.cancel(&id, path).status, 200);
    assert_eq!(
        fetch(&s, "GET", &reply_url, None).status,
        404,
        "after Cancel"
    );
    assert_eq!(
        fetch(&s, "HEAD", &reply_url, None).status,
        404,
        "after Cancel"
    );
}

#[test]
fn a_static_response_url_is_passed_through() {
    let static_url = "http://replies.example.test/r/42?sig=abc";
    let backend = Backend::start(move |_, _| {
        Answer::ok(b"").with_header("BITS-Static-Response-URL", static_url)
    });
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 11);
    let path = "/up/static.bin";
    let id = start_upload(&s, path, &data);
    let url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");
    assert_eq!(url, static_url);
    let url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
    assert_eq!(url, static_url, "a retry gets the recorded static URL");
    assert_eq!(backend.count(), 1);
    assert_eq!(s.close(&id, path).status, 200);
}

#[test]
fn copy_file_to_destination_puts_the_file_in_place_on_close() {
    let backend = Backend::start(|_, req| {
        let copy = req
            .header("BITS-Original-Request-URL")
            .is_some_and(|u| u.contains("copy"));
        let a = Answer::ok(b"noted\n");
        if copy {
            a.with_header("BITS-Copy-File-To-Destination", "yes")
        } else {
            a
        }
    });
    let s = start(&by_value(&backend.url("/app")));
    for (path, copy) in [("/up/copy/a.bin", true), ("/up/keep/a.bin", false)] {
        let data = random_bytes(SIZE, if copy { 12 } else { 13 });
        let dest = s.data_dir.join(path.trim_start_matches('/'));
        let id = start_upload(&s, path, &data);
        assert_final_ok(&final_fragment(&s, &id, path, &data), &data, path);
        assert!(
            !dest.exists(),
            "{path}: nothing at the destination before Close"
        );
        assert_eq!(s.close(&id, path).status, 200, "{path}: Close");
        if copy {
            assert!(dest.is_file(), "{path}: the file is at its destination");
            assert_eq!(file_sha256(&dest), sha256_hex(&data), "{path}: content");
        } else {
            assert!(
                !dest.exists(),
                "{path}: without the header it is not copied"
            );
        }
    }
    assert_eq!(backend.count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Once: the delivery record and the ledger
// ---------------------------------------------------------------------------------------------

#[test]
fn retried_final_fragments_and_closes_do_not_notify_again() {
    let backend = always_ok(b"only once\n");
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 14);
    let path = "/up/once.bin";
    let id = start_upload(&s, path, &data);
    let url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");
    assert_eq!(backend.count(), 1);
    assert!(
        s.session_dir(&id).join("delivery.json").is_file(),
        "the outcome is recorded before the Ack"
    );
    for i in 0..3 {
        let again = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
        assert_eq!(again, url, "retry {i}: the recorded reply URL");
    }
    assert_eq!(backend.count(), 1, "retried final fragments do not notify");
    assert_eq!(fetch(&s, "GET", &url, None).text(), "only once\n");
    assert_eq!(s.close(&id, path).status, 200);
    assert_eq!(s.close(&id, path).status, 200, "retried Close");
    assert_eq!(backend.count(), 1, "Close and its retry do not notify");
    assert_eq!(s.metric("bitsfarm_notifications_total"), 1.0);
}

#[test]
fn a_new_session_for_the_same_file_is_answered_from_the_ledger() {
    let backend = Backend::start(|i, _| Answer::ok(format!("reply #{i}\n").as_bytes()));
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 15);
    let path = "/up/ledger.bin";

    let a = start_upload(&s, path, &data);
    let url_a = assert_final_ok(&final_fragment(&s, &a, path, &data), &data, "first");
    assert_eq!(fetch(&s, "GET", &url_a, None).text(), "reply #0\n");
    assert_eq!(s.close(&a, path).status, 200);
    assert_eq!(backend.count(), 1);
    assert_eq!(
        s.metric("bitsfarm_duplicate_deliveries_suppressed_total"),
        0.0
    );

    // The client lost the session (say, a new job) and uploads the same file to the same URL.
    let b = start_upload(&s, path, &data);
    let url_b = assert_final_ok(&final_fragment(&s, &b, path, &data), &data, "second");
    assert_eq!(
        backend.count(),
        1,
        "the same file at the same URL is not sent again"
    );
    assert_eq!(
        s.metric("bitsfarm_duplicate_deliveries_suppressed_total"),
        1.0
    );
    assert_eq!(
        fetch(&s, "GET", &url_b, None).text(),
        "reply #0\n",
        "the recorded reply"
    );
    assert_eq!(s.close(&b, path).status, 200);

    // Other content at that URL, or the same content at another URL, is a new delivery.
    let other = random_bytes(SIZE, 16);
    let c = start_upload(&s, path, &other);
    assert_final_ok(
        &final_fragment(&s, &c, path, &other),
        &other,
        "other content",
    );
    let elsewhere = "/up/ledger-2.bin";
    let d = start_upload(&s, elsewhere, &data);
    assert_final_ok(
        &final_fragment(&s, &d, elsewhere, &data),
        &data,
        "other URL",
    );
    assert_eq!(backend.count(), 3);
    assert_eq!(
        s.metric("bitsfarm_duplicate_deliveries_suppressed_total"),
        1.0
    );
    let keys: Vec<_> = backend
        .requests()
        .iter()
        .map(|r| r.header("Idempotency-Key").unwrap().to_string())
        .collect();
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[0], keys[2]);
    assert_ne!(keys[1], keys[2]);
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

/// Kills the server by SIGKILL at `point` while it handles the final fragment, restarts it on the
/// same data folder, and lets the client retry the final fragment.
fn crash_at(point: &str, by_ref: bool) {
    let (receiver, _root, data_dir) = trusting_receiver();
    let url = receiver.url("/deliver");
    let args = if by_ref {
        by_reference(&url)
    } else {
        by_value(&url)
    };
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = Server::start_at(&data_dir, &a);
    s.set_env(&[(PAUSE_ENV, point)]);
    s.restart();
    let data = random_bytes(SIZE, 0xC0DE ^ point.len() as u64);
    let path = "/crash/upload.bin";
    let key = expected_key(path, &data);
    let id = start_upload(&s, path, &data);

    // The final fragment: the server pauses at `point` and never answers.
    let mut conn = s.connect();
    conn.write_raw(&final_fragment_request(&id, path, &data).to_bytes(s.addr))
        .expect("sending the final fragment");
    let line = s.wait_stdout(&format!("paused at {point}"), Duration::from_secs(30));
    assert!(
        line.is_some(),
        "the server did not pause at {point}; stdout {:?}; log:\n{}",
        s.stdout_lines(),
        s.log_tail()
    );
    let held = receiver.deliveries().len();
    match point {
        "before-notify" => assert_eq!(held, 0, "not yet delivered"),
        _ => assert_eq!(held, 1, "the backend already has it"),
    }
    let recorded = s.session_dir(&id).join("delivery.json").exists();
    assert_eq!(
        recorded,
        point == "after-record",
        "delivery.json at {point}"
    );

    s.kill();
    conn.set_read_timeout(Duration::from_secs(5));
    assert!(
        conn.read_response(false).is_err(),
        "the killed server must not have acknowledged the final fragment"
    );

    // Restarted without the pause; the client retries the final fragment.
    s.set_env(&[]);
    s.restart();
    let reply_url = assert_final_ok(
        &final_fragment(&s, &id, path, &data),
        &data,
        &format!("retry after a crash at {point}"),
    );

    let stored = receiver.deliveries();
    assert_eq!(stored.len(), 1, "{point}: exactly one copy: {stored:?}");
    assert_eq!(stored[0].key, key, "{point}: stored under the stable key");
    assert_eq!(
        stored[0].content_sha256,
        sha256_hex(&data),
        "{point}: content"
    );
    assert_eq!(receiver.metric("bitsfarm_receiver_deliveries_total"), 1.0);
    let dups = receiver.metric("bitsfarm_receiver_duplicates_suppressed_total");
    let restarted_notifications = s.metric("bitsfarm_notifications_total");
    match point {
        "before-notify" => {
            assert_eq!(dups, 0.0, "{point}: first delivery only after the restart");
            assert_eq!(restarted_notifications, 1.0);
        }
        "after-notify" => {
            assert_eq!(
                dups, 1.0,
                "{point}: re-sent with the same key and suppressed"
            );
            assert_eq!(restarted_notifications, 1.0);
        }
        _ => {
            assert_eq!(dups, 0.0, "{point}: no second notification at all");
            assert_eq!(restarted_notifications, 0.0, "{point}: nothing sent again");
        }
    }

    // The reply the client finally gets is the backend's.
    let r = fetch(&s, "GET", &reply_url, None);
    assert_eq!(r.status, 200, "{point}: GET reply: {r:?}");
    assert_eq!(r.text(), stored[0].reply(), "{point}: the backend's reply");

    // Retrying once more changes nothing; Close finishes.
    assert_final_ok(
        &final_fragment(&s, &id, path, &data),
        &data,
        "another retry",
    );
    assert_eq!(s.close(&id, path).status, 200);
    assert_eq!(fetch(&s, "GET", &reply_url, None).status, 404);
    let total_requests = receiver.metric("bitsfarm_receiver_deliveries_total")
        + receiver.metric("bitsfarm_receiver_duplicates_suppressed_total");
    let expected_requests = if point == "after-notify" { 2.0 } else { 1.0 };
    assert_eq!(total_requests, expected_requests, "{point}: notifications");
    assert_eq!(receiver.deliveries().len(), 1);
}

#[test]
fn crash_before_notify() {
    crash_at("before-notify", false);
}

#[test]
fn crash_after_notify() {
    crash_at("after-notify", false);
}

#[test]
fn crash_after_record() {
    crash_at("after-record", false);
}

#[test]
fn crash_after_notify_by_reference() {
    crash_at("after-notify", true);
}

/// While the server waits for a slow backend, a second copy of the final fragment (the client gave
/// up and retried) must not cause a second notification: the session is busy and answers the
/// retry only once the first delivery is recorded.
#[test]
fn a_retry_during_a_slow_delivery_does_not_notify_twice() {
    let backend = Backend::start(|i, _| {
        if i == 0 {
            thread::sleep(Duration::from_millis(1500));
        }
        Answer::ok(b"slow reply\n")
    });
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 17);
    let path = "/up/race.bin";
    let id = start_upload(&s, path, &data);
    let mut first = s.connect();
    first
        .write_raw(&final_fragment_request(&id, path, &data).to_bytes(s.addr))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || backend.count() == 1));
    let second = final_fragment(&s, &id, path, &data);
    let url2 = assert_final_ok(&second, &data, "the retry");
    let url1 = assert_final_ok(&first.read_response(false).unwrap(), &data, "the first");
    assert_eq!(url1, url2);
    assert_eq!(backend.count(), 1, "one notification");
}

#[test]
fn a_zero_byte_upload_is_delivered_too() {
    let backend = always_ok(b"empty noted\n");
    let s = start(&by_value(&backend.url("/app")));
    let path = "/up/empty.bin";
    let id = s.create_session(path);
    let r = s.send(&empty_fragment_request(&id, path));
    assert_final_ok(&r, &[], "empty fragment");
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].header("Content-Length"), Some("0"));
    assert!(reqs[0].body.is_empty());
    assert_eq!(
        reqs[0].header("Idempotency-Key"),
        Some(expected_key(path, &[]).as_str())
    );
    assert_eq!(
        reqs[0].header("Repr-Digest"),
        Some(expected_digest(&[]).as_str())
    );
    assert_eq!(s.close(&id, path).status, 200);
}

#[test]
fn the_reply_url_lives_under_the_upload_path() {
    let backend = always_ok(b"vdir reply\n");
    let mut args = by_value(&backend.url("/app"));
    args.extend(["--upload-path".to_string(), "/vdir".to_string()]);
    let s = start(&args);
    let data = random_bytes(SIZE, 18);
    let path = "/vdir/sub/a.bin";
    let id = start_upload(&s, path, &data);
    let url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "final");
    assert!(
        url.starts_with("/vdir/BITS-Sessions/Replies/%7B"),
        "reply URL {url:?}"
    );
    let r = fetch(&s, "GET", &url, Some("bytes=0-3"));
    assert_eq!((r.status, r.text().as_str()), (206, "vdir"), "{r:?}");
    // The same session's reply is not reachable through another prefix.
    let outside = url.trim_start_matches("/vdir");
    assert_eq!(fetch(&s, "GET", outside, None).status, 404);
}

/// A ledger entry whose reply copy is missing (a crash while the ledger was written) must not be
/// answered with an empty reply: the file is delivered again, with the same key, and the backend's
/// reply is what the client gets.
#[test]
fn a_ledger_entry_without_its_reply_is_not_trusted() {
    let backend = Backend::start(|i, _| Answer::ok(format!("reply #{i}\n").as_bytes()));
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 19);
    let path = "/up/torn.bin";
    let a = start_upload(&s, path, &data);
    assert_final_ok(&final_fragment(&s, &a, path, &data), &data, "first");
    assert_eq!(s.close(&a, path).status, 200);
    let key = expected_key(path, &data);
    let ledger = s.data_dir.join("BITS-Sessions").join("Delivered");
    assert!(ledger.join(format!("{key}.json")).is_file(), "ledger entry");
    std::fs::remove_file(ledger.join(format!("{key}.reply"))).expect("the ledger's reply copy");

    let b = start_upload(&s, path, &data);
    let url = assert_final_ok(&final_fragment(&s, &b, path, &data), &data, "second");
    let r = fetch(&s, "GET", &url, None);
    assert_ne!(
        r.text(),
        "",
        "an empty reply was served from a torn ledger entry"
    );
    assert_eq!(backend.count(), 2, "delivered again");
    let keys: Vec<_> = backend
        .requests()
        .iter()
        .map(|r| r.header("Idempotency-Key").unwrap().to_string())
        .collect();
    assert_eq!(keys, vec![key.clone(), key], "with the same key");
    assert_eq!(r.text(), "reply #1\n");
}

/// The notify timeout covers the whole exchange: a backend that sends its answer's head and then
/// stalls in the body gets the same 408, and no partial reply is ever served.
#[test]
fn a_backend_stalling_in_its_reply_body_times_out() {
    let backend = Backend::start(|i, _| match i {
        0 => Answer::HeadThenStall(Duration::from_secs(20)),
        _ => Answer::ok(b"complete reply\n"),
    });
    let mut args = by_value(&backend.url("/app"));
    args.extend(["--notify-timeout".to_string(), "1".to_string()]);
    let s = start(&args);
    let data = random_bytes(SIZE, 20);
    let path = "/up/half.bin";
    let id = start_upload(&s, path, &data);
    let t = Instant::now();
    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 408, NOTIFICATION_TIMEOUT, "stalled reply body");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let url = assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
    assert_eq!(fetch(&s, "GET", &url, None).text(), "complete reply\n");
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].header("Idempotency-Key"),
        reqs[1].header("Idempotency-Key")
    );
}

/// Redirects from the application are relayed, not followed.
#[test]
fn a_backend_redirect_is_relayed_not_followed() {
    let backend = Backend::start(|i, _| match i {
        0 => Answer::status(302, b"").with_header("Location", "/elsewhere"),
        _ => Answer::ok(b"ok\n"),
    });
    let s = start(&by_value(&backend.url("/app")));
    let data = random_bytes(SIZE, 21);
    let path = "/up/redirect.bin";
    let id = start_upload(&s, path, &data);
    let r = final_fragment(&s, &id, path, &data);
    assert_app_error(&r, 302, "0x8019012E", "redirect");
    assert_eq!(backend.count(), 1, "the redirect was not followed");
    assert_final_ok(&final_fragment(&s, &id, path, &data), &data, "retry");
    assert_eq!(backend.requests()[1].target, "/app");
}
