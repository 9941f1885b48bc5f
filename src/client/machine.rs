//! The client's side of [MC-BUP] 3.1 as rules, pure: what an answer means (`classify` and the
//! steps built on it for Create-Session, Fragment and Close-Session), where packets go (the host
//! id and its fallback timer) and what to send next (the next fragment from the offset and the
//! fragment size). No I/O and no clock: the loop in `uploader.rs` passes the time in, so every
//! rule is tested here on its own.

use std::time::{Duration, Instant};

use reqwest::Url;

use super::ClientError;
use crate::bits::protocol::{
    BITS_1_5_UPLOAD_PROTOCOL, FragmentRange, header, hresult, parse_hresult,
};

/// Windows never shrinks fragments below 5 KB on 413 ([MC-BUP] <10>).
pub const MIN_FRAGMENT: u64 = 5 * 1024;
/// How much of the upload-reply one ranged GET asks for.
pub const REPLY_CHUNK: u64 = 1 << 20;

/// An answer to a packet, as the rules read it: whatever carries it (reqwest's response in the
/// client, the server's own `bits::protocol::Ack` in the tests) shows its status and headers.
pub trait Answer {
    fn status(&self) -> u16;
    /// A header's value, trimmed; None when absent or not visible ASCII.
    fn header(&self, name: &str) -> Option<&str>;

    /// `BITS-Error-Code`, or the spelling [MC-BUP] 2.2.1.2 uses, read as peers write it.
    fn error_code(&self) -> Option<u32> {
        self.header(header::ERROR_CODE)
            .or_else(|| self.header(header::ERROR_CODE_SPEC))
            .and_then(parse_hresult)
    }

    /// `BITS-Received-Content-Range`: the next byte the server expects.
    fn received(&self) -> Option<u64> {
        self.header(header::RECEIVED_CONTENT_RANGE)?.parse().ok()
    }

    /// The answer in a few words, for retry events and the no-progress error.
    fn describe(&self) -> String {
        format!(
            "HTTP {} code {}",
            self.status(),
            self.header(header::ERROR_CODE).unwrap_or("-")
        )
    }
}

/// How the client reacts to an answer ([MC-BUP] 3.1.5, W32 bits-return-values).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    SessionLost,
    Shrink,
    Transient,
    Fatal,
}

pub fn classify(a: &impl Answer) -> Verdict {
    let s = a.status();
    let code = a.error_code();
    if s == 200 || s == 201 {
        return Verdict::Ok;
    }
    if code == Some(hresult::BG_E_SESSION_NOT_FOUND) {
        return Verdict::SessionLost;
    }
    if s == 413 {
        return Verdict::Shrink;
    }
    if code == Some(hresult::BG_E_TOO_LARGE)
        || code == Some(hresult::E_INVALIDARG)
        || code == Some(hresult::E_ACCESSDENIED)
    {
        return Verdict::Fatal;
    }
    match s {
        408 | 409 => Verdict::Transient,
        300..=305 | 307 => Verdict::Fatal,
        400..=499 => Verdict::Fatal,
        501 | 505 => Verdict::Fatal,
        _ => Verdict::Transient,
    }
}

/// The error for an answer the client gives up on; `what` says which packet was refused.
pub fn refusal(a: &impl Answer, what: &str) -> ClientError {
    ClientError::Refused {
        status: a.status(),
        code: a.header(header::ERROR_CODE).unwrap_or("-").to_string(),
        context: a.header(header::ERROR_CONTEXT).unwrap_or("-").to_string(),
        message: what.to_string(),
    }
}

/// Replaces the host (and port, when the host id names one) of `url`, keeping the path: what a
/// client does with `BITS-Host-Id`.
pub fn url_for_host(url: &Url, host_id: &str) -> Result<Url, String> {
    let mut u = url.clone();
    let probe = Url::parse(&format!("{}://{host_id}/", url.scheme()))
        .map_err(|e| format!("BITS-Host-Id {host_id:?} is not a host name: {e}"))?;
    let host = probe
        .host_str()
        .ok_or_else(|| format!("BITS-Host-Id {host_id:?} is not a host name"))?;
    u.set_host(Some(host))
        .map_err(|e| format!("BITS-Host-Id {host_id:?}: {e}"))?;
    if let Some(port) = probe.port() {
        let _ = u.set_port(Some(port));
    }
    Ok(u)
}

/// Whether the server's `BITS-Protocol` names the one protocol the client offered, compared as
/// GUIDs (any case, braces or not).
fn is_our_protocol(chosen: &str) -> bool {
    fn bare(guid: &str) -> &str {
        guid.trim_matches(|c| c == '{' || c == '}')
    }
    bare(chosen).eq_ignore_ascii_case(bare(BITS_1_5_UPLOAD_PROTOCOL))
}

/// A session the client holds, and where its packets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// Where packets go: the original URL, or the host named by BITS-Host-Id.
    pub target: Url,
    pub host_id: Option<String>,
    pub fallback_timeout: Option<Duration>,
    /// When the first error since the last progress happened, while a host id is in use.
    pub fallback_started: Option<Instant>,
}

impl Session {
    /// The session a successful Create-Session answer grants to an upload to `url`. An answer that
    /// says Ok but names no session, another protocol or an unusable host is an error to retry.
    pub fn granted(a: &impl Answer, url: &Url) -> Result<Session, String> {
        let Some(id) = a.header(header::SESSION_ID).map(str::to_string) else {
            return Err("Create-Session was answered without BITS-Session-Id".into());
        };
        let proto = a.header(header::PROTOCOL).unwrap_or("");
        if !is_our_protocol(proto) {
            return Err(format!("the server chose an unknown protocol {proto:?}"));
        }
        let host_id = a
            .header(header::HOST_ID)
            .filter(|h| !h.is_empty())
            .map(str::to_string);
        let target = match &host_id {
            Some(h) => url_for_host(url, h)?,
            None => url.clone(),
        };
        let fallback_timeout = a
            .header(header::HOST_ID_FALLBACK_TIMEOUT)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        Ok(Session {
            id,
            target,
            host_id,
            fallback_timeout,
            fallback_started: None,
        })
    }

    /// After a transient error at `now`: whether the host id's fallback timer has run out, in which
    /// case packets go back to the original `url` from now on. The timer runs from the first error
    /// since the last progress, and only while packets go to the host id's host.
    pub fn falls_back(&mut self, url: &Url, now: Instant) -> bool {
        if self.host_id.is_none() || self.target == *url {
            return false;
        }
        let started = *self.fallback_started.get_or_insert(now);
        // No header means "never fall back" ([MC-BUP] 3.1.5.1.7).
        let due = self
            .fallback_timeout
            .is_some_and(|t| now.saturating_duration_since(started) >= t);
        if due {
            self.target = url.clone();
        }
        due
    }

    /// The server took bytes: the fallback timer starts again at the next error.
    pub fn progressed(&mut self) {
        self.fallback_started = None;
    }
}

/// What a Create-Session answer means.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Session(Session),
    /// Wait and send it again; the reason is for the retry event.
    Retry(String),
    Refused,
}

pub fn after_create(a: &impl Answer, url: &Url) -> Created {
    match classify(a) {
        Verdict::Ok => match Session::granted(a, url) {
            Ok(s) => Created::Session(s),
            Err(why) => Created::Retry(why),
        },
        Verdict::Fatal | Verdict::Shrink => Created::Refused,
        Verdict::SessionLost | Verdict::Transient => Created::Retry(a.describe()),
    }
}

/// What a Close-Session answer means: retried on 5xx other than "session not found", and on 408
/// (W32 ack-for-close-session).
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Yes,
    /// The server no longer knows the session: a retried Close whose first attempt succeeded, so
    /// the upload is in place.
    Already,
    Retry,
    Refused,
}

pub fn after_close(a: &impl Answer) -> Closed {
    match classify(a) {
        Verdict::Ok => Closed::Yes,
        Verdict::SessionLost => Closed::Already,
        _ if (500..=599).contains(&a.status()) || a.status() == 408 => Closed::Retry,
        _ => Closed::Refused,
    }
}

/// Where the upload stands: the next byte the server wants, and how much goes in one fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub size: u64,
    pub offset: u64,
    pub fragment_size: u64,
}

/// What a Fragment answer means; `Transfer::answered` has already moved the offset or the
/// fragment size where the answer says.
#[derive(Debug, PartialEq, Eq)]
pub enum Fragmented {
    /// The server has the bytes up to the offset; `progress` when that is further than before
    /// (an empty upload's one fragment counts as progress).
    Accepted {
        progress: bool,
    },
    /// The server lost the session: start again from zero in a new one.
    SessionLost,
    /// 413: the fragment size was halved.
    Shrunk,
    /// 416: the offset jumped to where the server is, when it said.
    Resynced,
    Refused,
    Retry,
}

impl Transfer {
    pub fn new(size: u64, fragment_size: u64) -> Self {
        Transfer {
            size,
            offset: 0,
            fragment_size,
        }
    }

    /// Whether a Fragment is still to be sent. An empty upload sends its one empty Fragment
    /// (`bytes */0`), except when it resumes a session an earlier run made.
    pub fn has_more(&self, resumed: bool) -> bool {
        self.offset < self.size || (self.size == 0 && !resumed)
    }

    /// True once the server has every byte.
    pub fn finished(&self) -> bool {
        self.offset >= self.size
    }

    /// A new session starts from the first byte.
    pub fn restart(&mut self) {
        self.offset = 0;
    }

    /// The next fragment to send: from the offset, one fragment size long at most.
    pub fn next_fragment(&self) -> FragmentRange {
        self.fragment_from(self.offset)
    }

    /// The fragment after `sent`, to read from disk while `sent` is on the wire (empty at the end).
    pub fn following(&self, sent: FragmentRange) -> FragmentRange {
        self.fragment_from(sent.end)
    }

    fn fragment_from(&self, start: u64) -> FragmentRange {
        let start = start.min(self.size);
        FragmentRange {
            start,
            end: start.saturating_add(self.fragment_size).min(self.size),
            total: self.size,
        }
    }

    /// Applies the answer to the fragment `sent`.
    pub fn answered(&mut self, a: &impl Answer, sent: FragmentRange) -> Fragmented {
        match classify(a) {
            Verdict::Ok => {
                let next = a.received().unwrap_or(sent.end);
                let progress = next > self.offset || self.size == 0;
                self.offset = next.min(self.size);
                Fragmented::Accepted { progress }
            }
            Verdict::SessionLost => {
                self.restart();
                Fragmented::SessionLost
            }
            Verdict::Shrink => {
                self.fragment_size = (self.fragment_size / 2).max(MIN_FRAGMENT);
                Fragmented::Shrunk
            }
            Verdict::Fatal if a.status() == 416 => {
                if let Some(next) = a.received() {
                    self.offset = next.min(self.size);
                }
                Fragmented::Resynced
            }
            Verdict::Fatal => Fragmented::Refused,
            Verdict::Transient => Fragmented::Retry,
        }
    }
}

/// Where the upload-reply is: `BITS-Reply-URL` relative to the session's target (Windows
/// servers may write it with backslashes).
pub fn reply_url(base: &Url, reply_url: &str) -> Result<Url, String> {
    base.join(&reply_url.replace('\\', "/"))
        .map_err(|e| format!("BITS-Reply-URL {reply_url:?} is not a URL: {e}"))
}

/// The `Range` of the reply's chunk from byte `at`.
pub fn reply_range(at: u64) -> String {
    format!("bytes={}-{}", at, at.saturating_add(REPLY_CHUNK - 1))
}

/// The reply's whole length from a 206's `Content-Range` (`bytes a-b/TOTAL`).
pub fn reply_total(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
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
        assert!(
            matches!(after_create(&bad_host, &url()), Created::Retry(m) if m.contains("bad host"))
        );
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
}
