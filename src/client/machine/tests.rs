//! The client's rules, each on its own, against answers as bitsfarm's server writes them.

use super::*;
use crate::bits::protocol::{Ack, BitsError};

/// The server's own Ack stands for any answer, so these tests also check that the client reads
/// what the server writes.
impl Answer for Ack {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: &str) -> Option<&str> {
        Ack::header(self, name).map(str::trim)
    }
}

fn ack(status: u16, code: Option<&str>) -> Ack {
    let ack = Ack {
        status,
        headers: Vec::new(),
    };
    match code {
        Some(c) => ack.with(header::ERROR_CODE, c),
        None => ack,
    }
}

fn url() -> Url {
    Url::parse("http://shared:8080/up/a.bin").unwrap()
}

/// A Create-Session Ok as bitsfarm sends it, with these extra headers.
fn created(extra: &[(&'static str, &str)]) -> Ack {
    let mut a = Ack::ok()
        .with(header::SESSION_ID, "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
        .with(header::PROTOCOL, BITS_1_5_UPLOAD_PROTOCOL);
    for &(k, v) in extra {
        a = a.with(k, v);
    }
    a
}

#[test]
fn answers_are_classified_as_windows_does() {
    assert_eq!(classify(&ack(200, None)), Verdict::Ok);
    assert_eq!(
        classify(&ack(500, Some("0x8020001F"))),
        Verdict::SessionLost
    );
    assert_eq!(classify(&ack(500, Some("8020001f"))), Verdict::SessionLost);
    assert_eq!(classify(&ack(500, Some("0x80200020"))), Verdict::Fatal);
    assert_eq!(classify(&ack(413, None)), Verdict::Shrink);
    assert_eq!(classify(&ack(403, Some("0x80070005"))), Verdict::Fatal);
    assert_eq!(classify(&ack(400, Some("0x80070057"))), Verdict::Fatal);
    assert_eq!(classify(&ack(408, Some("0x80070112"))), Verdict::Transient);
    assert_eq!(classify(&ack(409, None)), Verdict::Transient);
    assert_eq!(classify(&ack(503, None)), Verdict::Transient);
    assert_eq!(classify(&ack(501, None)), Verdict::Fatal);
    assert_eq!(classify(&ack(500, Some("0x80070070"))), Verdict::Transient);
}

#[test]
fn the_servers_own_errors_mean_what_the_server_intends() {
    let v = |e: BitsError| classify(&Ack::from(e));
    assert_eq!(v(BitsError::session_not_found()), Verdict::SessionLost);
    assert_eq!(v(BitsError::fragment_too_large(10, 5)), Verdict::Shrink);
    assert_eq!(v(BitsError::draining()), Verdict::Transient);
    assert_eq!(v(BitsError::session_limit("full")), Verdict::Transient);
    assert_eq!(v(BitsError::owner_unreachable("away")), Verdict::Transient);
    assert_eq!(v(BitsError::disk_full()), Verdict::Transient);
    assert_eq!(v(BitsError::internal("io")), Verdict::Transient);
    assert_eq!(v(BitsError::out_of_sync(5)), Verdict::Fatal);
    assert_eq!(v(BitsError::too_large("big")), Verdict::Fatal);
    assert_eq!(v(BitsError::invalid("bad")), Verdict::Fatal);
    assert_eq!(v(BitsError::access_denied("no")), Verdict::Fatal);
    assert_eq!(v(BitsError::authentication_required()), Verdict::Fatal);
    assert_eq!(v(BitsError::not_found("gone")), Verdict::Fatal);
}

#[test]
fn error_codes_are_read_in_either_spelling_and_any_form() {
    assert_eq!(
        ack(500, Some(" 0x8020001f ")).error_code(),
        Some(0x8020_001F)
    );
    let spec = Ack::ok().with(header::ERROR_CODE_SPEC, "2149580831");
    assert_eq!(spec.error_code(), Some(hresult::BG_E_SESSION_NOT_FOUND));
    assert_eq!(ack(500, Some("zz")).error_code(), None);
    assert_eq!(ack(500, None).error_code(), None);
    assert_eq!(ack(503, None).describe(), "HTTP 503 code -");
    assert_eq!(
        Ack::from(BitsError::disk_full()).describe(),
        "HTTP 500 code 0x80070070"
    );
}

#[test]
fn a_refusal_carries_status_code_and_context() {
    let e = refusal(
        &Ack::from(BitsError::access_denied("no")),
        "a fragment was refused",
    );
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.to_string(),
        "the server refused the upload: HTTP 403, BITS-Error-Code 0x80070005, context 0x5: a fragment was refused"
    );
    let e = refusal(&ack(501, None), "Close-Session was refused");
    assert!(
        e.to_string()
            .contains("HTTP 501, BITS-Error-Code -, context -")
    );
}

#[test]
fn host_ids_replace_only_the_host() {
    let u = Url::parse("http://shared:8080/up/a.bin?x=1").unwrap();
    assert_eq!(
        url_for_host(&u, "pod-1.farm").unwrap().as_str(),
        "http://pod-1.farm:8080/up/a.bin?x=1"
    );
    assert_eq!(
        url_for_host(&u, "127.0.0.1:9001").unwrap().as_str(),
        "http://127.0.0.1:9001/up/a.bin?x=1"
    );
    assert!(url_for_host(&u, "bad host").is_err());
}

#[test]
fn create_session_grants_a_session_at_the_host_id() {
    let Created::Session(s) = after_create(&created(&[]), &url()) else {
        panic!("not granted");
    };
    assert_eq!(s.id, "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}");
    assert_eq!((s.target.clone(), s.host_id.clone()), (url(), None));
    assert_eq!(s.fallback_timeout, None);

    let a = created(&[
        (header::HOST_ID, "pod-1.farm"),
        (header::HOST_ID_FALLBACK_TIMEOUT, "30"),
    ]);
    let Created::Session(s) = after_create(&a, &url()) else {
        panic!("not granted");
    };
    assert_eq!(s.target.as_str(), "http://pod-1.farm:8080/up/a.bin");
    assert_eq!(s.host_id.as_deref(), Some("pod-1.farm"));
    assert_eq!(s.fallback_timeout, Some(Duration::from_secs(30)));

    // An empty host id is no host id.
    let Created::Session(s) = after_create(&created(&[(header::HOST_ID, "")]), &url()) else {
        panic!("not granted");
    };
    assert_eq!((s.target, s.host_id), (url(), None));
}

#[test]
fn create_session_protocol_is_compared_as_a_guid() {
    let upper = BITS_1_5_UPLOAD_PROTOCOL.to_uppercase();
    let bare = BITS_1_5_UPLOAD_PROTOCOL.trim_matches(|c| c == '{' || c == '}');
    for chosen in [upper.as_str(), bare] {
        let a = Ack::ok()
            .with(header::SESSION_ID, "{A}")
            .with(header::PROTOCOL, chosen);
        assert!(
            matches!(after_create(&a, &url()), Created::Session(_)),
            "{chosen}"
        );
    }
}

#[test]
fn create_session_answers_that_say_ok_but_cannot_be_used_are_retried() {
    let no_id = Ack::ok().with(header::PROTOCOL, BITS_1_5_UPLOAD_PROTOCOL);
    assert_eq!(
        after_create(&no_id, &url()),
        Created::Retry("Create-Session was answered without BITS-Session-Id".into())
    );
    let other = Ack::ok()
        .with(header::SESSION_ID, "{A}")
        .with(header::PROTOCOL, "{00000000-0000-0000-0000-000000000000}");
    assert!(
        matches!(after_create(&other, &url()), Created::Retry(m) if m.contains("unknown protocol"))
    );
    let no_proto = Ack::ok().with(header::SESSION_ID, "{A}");
    assert!(matches!(after_create(&no_proto, &url()), Created::Retry(_)));
    let bad_host = created(&[(header::HOST_ID, "bad host")]);
    assert!(matches!(after_create(&bad_host, &url()), Created::Retry(m) if m.contains("bad host")));
}

#[test]
fn create_session_errors_are_refused_or_retried() {
    let c = |e: BitsError| after_create(&Ack::from(e), &url());
    assert_eq!(c(BitsError::access_denied("no")), Created::Refused);
    assert_eq!(c(BitsError::fragment_too_large(1, 0)), Created::Refused);
    assert_eq!(
        c(BitsError::draining()),
        Created::Retry("HTTP 503 code 0x801901F7".into())
    );
    assert!(matches!(
        c(BitsError::session_not_found()),
        Created::Retry(_)
    ));
}

#[test]
fn close_session_is_retried_on_5xx_and_408_and_done_when_the_session_is_gone() {
    assert_eq!(after_close(&Ack::ok()), Closed::Yes);
    assert_eq!(after_close(&ack(201, None)), Closed::Yes);
    assert_eq!(
        after_close(&Ack::from(BitsError::session_not_found())),
        Closed::Already
    );
    assert_eq!(after_close(&ack(503, None)), Closed::Retry);
    assert_eq!(after_close(&ack(408, None)), Closed::Retry);
    assert_eq!(
        after_close(&Ack::from(BitsError::disk_full())),
        Closed::Retry
    );
    // A 5xx the client otherwise gives up on is still worth another Close.
    assert_eq!(after_close(&ack(501, None)), Closed::Retry);
    assert_eq!(
        after_close(&Ack::from(BitsError::too_large("x"))),
        Closed::Retry
    );
    assert_eq!(after_close(&ack(409, None)), Closed::Refused);
    assert_eq!(
        after_close(&Ack::from(BitsError::access_denied("no"))),
        Closed::Refused
    );
}

fn session_at_host(timeout: Option<u64>) -> Session {
    let mut extra = vec![(header::HOST_ID, "pod-1.farm")];
    let t = timeout.map(|t| t.to_string());
    if let Some(t) = &t {
        extra.push((header::HOST_ID_FALLBACK_TIMEOUT, t.as_str()));
    }
    Session::granted(&created(&extra), &url()).unwrap()
}

#[test]
fn the_host_id_falls_back_after_its_timeout_from_the_first_error() {
    let t0 = Instant::now();
    let mut s = session_at_host(Some(10));
    assert!(!s.falls_back(&url(), t0));
    assert!(!s.falls_back(&url(), t0 + Duration::from_secs(9)));
    assert_ne!(s.target, url());
    assert!(s.falls_back(&url(), t0 + Duration::from_secs(10)));
    assert_eq!(s.target, url());
    // Back at the original URL there is nothing left to fall back from.
    assert!(!s.falls_back(&url(), t0 + Duration::from_secs(100)));
}

#[test]
fn progress_restarts_the_fallback_timer() {
    let t0 = Instant::now();
    let mut s = session_at_host(Some(10));
    assert!(!s.falls_back(&url(), t0));
    s.progressed();
    assert!(!s.falls_back(&url(), t0 + Duration::from_secs(8)));
    assert!(!s.falls_back(&url(), t0 + Duration::from_secs(12)));
    assert!(s.falls_back(&url(), t0 + Duration::from_secs(18)));
}

#[test]
fn without_a_timeout_or_a_host_id_there_is_no_fallback() {
    let t0 = Instant::now();
    let mut s = session_at_host(None);
    assert!(!s.falls_back(&url(), t0));
    assert!(!s.falls_back(&url(), t0 + Duration::from_secs(1 << 30)));
    let Created::Session(mut plain) = after_create(&created(&[]), &url()) else {
        panic!("not granted");
    };
    plain.fallback_timeout = Some(Duration::ZERO);
    assert!(!plain.falls_back(&url(), t0));
    assert_eq!(plain.fallback_started, None);
}

#[test]
fn while_the_host_does_not_answer_the_time_left_before_the_fallback_is_known() {
    let t0 = Instant::now();
    let mut s = session_at_host(Some(10));
    assert_eq!(s.host_in_use(&url()), Some("pod-1.farm"));
    // The timer runs from the first error only.
    assert_eq!(s.falls_back_in(t0), None);
    assert!(!s.falls_back(&url(), t0));
    assert_eq!(s.falls_back_in(t0), Some(Duration::from_secs(10)));
    assert_eq!(
        s.falls_back_in(t0 + Duration::from_secs(4)),
        Some(Duration::from_secs(6))
    );
    assert_eq!(
        s.falls_back_in(t0 + Duration::from_secs(40)),
        Some(Duration::ZERO)
    );
    assert!(s.falls_back(&url(), t0 + Duration::from_secs(10)));
    assert_eq!(s.host_in_use(&url()), None);

    let mut never = session_at_host(None);
    assert!(!never.falls_back(&url(), t0));
    assert_eq!(never.host_in_use(&url()), Some("pod-1.farm"));
    assert_eq!(never.falls_back_in(t0), None);
}

#[test]
fn fragments_follow_the_offset_and_the_fragment_size() {
    let mut t = Transfer::new(10, 4);
    assert_eq!(t.next_fragment().to_string(), "bytes 0-3/10");
    assert_eq!(t.following(t.next_fragment()).to_string(), "bytes 4-7/10");
    t.offset = 8;
    let last = t.next_fragment();
    assert_eq!(last.to_string(), "bytes 8-9/10");
    assert!(last.is_last());
    assert!(t.following(last).is_empty());
    let huge = Transfer::new(10, u64::MAX);
    assert_eq!(huge.next_fragment().to_string(), "bytes 0-9/10");
}

#[test]
fn an_empty_upload_sends_one_empty_fragment_unless_resumed() {
    let t = Transfer::new(0, 4);
    assert_eq!(t.next_fragment().to_string(), "bytes */0");
    assert!(t.has_more(false));
    assert!(!t.has_more(true));
    assert!(t.finished());
    let mut t = t;
    assert_eq!(
        t.answered(&Ack::ok(), t.next_fragment()),
        Fragmented::Accepted { progress: true }
    );
    assert!(t.finished());
}

#[test]
fn an_accepted_fragment_moves_to_where_the_server_is() {
    let mut t = Transfer::new(10, 4);
    let sent = t.next_fragment();
    assert_eq!(
        t.answered(&Ack::ok(), sent),
        Fragmented::Accepted { progress: true }
    );
    assert_eq!(t.offset, 4);
    // The server says where it is, which wins over what was sent.
    let sent = t.next_fragment();
    let a = Ack::ok().with(header::RECEIVED_CONTENT_RANGE, "6");
    assert_eq!(
        t.answered(&a, sent),
        Fragmented::Accepted { progress: true }
    );
    assert_eq!(t.offset, 6);
    let a = Ack::ok().with(header::RECEIVED_CONTENT_RANGE, "6");
    assert_eq!(
        t.answered(&a, t.next_fragment()),
        Fragmented::Accepted { progress: false }
    );
    let a = Ack::ok().with(header::RECEIVED_CONTENT_RANGE, "99");
    assert_eq!(
        t.answered(&a, t.next_fragment()),
        Fragmented::Accepted { progress: true }
    );
    assert_eq!(t.offset, 10);
    assert!(t.finished() && !t.has_more(false));
}

#[test]
fn a_413_halves_the_fragment_down_to_5_kb() {
    let mut t = Transfer::new(1 << 20, 16 * 1024);
    let too_large = Ack::from(BitsError::fragment_too_large(16 * 1024, 1024));
    assert_eq!(
        t.answered(&too_large, t.next_fragment()),
        Fragmented::Shrunk
    );
    assert_eq!(t.fragment_size, 8 * 1024);
    t.answered(&too_large, t.next_fragment());
    assert_eq!(t.fragment_size, MIN_FRAGMENT);
    t.answered(&too_large, t.next_fragment());
    assert_eq!(t.fragment_size, MIN_FRAGMENT);
    assert_eq!(t.offset, 0);
}

#[test]
fn a_416_jumps_to_where_the_server_is() {
    let mut t = Transfer::new(100, 10);
    t.offset = 50;
    let out_of_sync = Ack::from(BitsError::out_of_sync(20));
    assert_eq!(
        t.answered(&out_of_sync, t.next_fragment()),
        Fragmented::Resynced
    );
    assert_eq!(t.offset, 20);
    let beyond = Ack::from(BitsError::out_of_sync(500));
    t.answered(&beyond, t.next_fragment());
    assert_eq!(t.offset, 100);
    // Without the header the client stays where it is.
    let mut t = Transfer::new(100, 10);
    t.offset = 30;
    assert_eq!(
        t.answered(&ack(416, None), t.next_fragment()),
        Fragmented::Resynced
    );
    assert_eq!(t.offset, 30);
}

#[test]
fn a_lost_session_starts_over_and_errors_are_refused_or_retried() {
    let mut t = Transfer::new(100, 10);
    t.offset = 40;
    let lost = Ack::from(BitsError::session_not_found());
    assert_eq!(
        t.answered(&lost, t.next_fragment()),
        Fragmented::SessionLost
    );
    assert_eq!(t.offset, 0);
    t.offset = 40;
    let denied = Ack::from(BitsError::access_denied("no"));
    assert_eq!(t.answered(&denied, t.next_fragment()), Fragmented::Refused);
    let full = Ack::from(BitsError::disk_full());
    assert_eq!(t.answered(&full, t.next_fragment()), Fragmented::Retry);
    assert_eq!((t.offset, t.fragment_size), (40, 10));
}

#[test]
fn the_reply_is_fetched_in_ranged_chunks() {
    let base = Url::parse("http://pod-1:8080/up/a.bin").unwrap();
    assert_eq!(
        reply_url(&base, "\\replies\\r1").unwrap().as_str(),
        "http://pod-1:8080/replies/r1"
    );
    assert_eq!(
        reply_url(&base, "r1").unwrap().as_str(),
        "http://pod-1:8080/up/r1"
    );
    assert!(reply_url(&base, "http://[bad").is_err());
    assert_eq!(reply_range(0), "bytes=0-1048575");
    assert_eq!(reply_range(REPLY_CHUNK), "bytes=1048576-2097151");
    assert_eq!(reply_total("bytes 0-9/10"), Some(10));
    assert_eq!(reply_total("bytes 0-9/*"), None);
    assert_eq!(reply_total("10"), None);
}
