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

    /// The host id that packets go to, while they go there rather than to the original `url`.
    pub fn host_in_use(&self, url: &Url) -> Option<&str> {
        self.host_id.as_deref().filter(|_| self.target != *url)
    }

    /// How long until the fallback timer runs out at `now`; None while it is not running, and
    /// when the server set no timeout (the client never falls back).
    pub fn falls_back_in(&self, now: Instant) -> Option<Duration> {
        let (started, timeout) = (self.fallback_started?, self.fallback_timeout?);
        Some(timeout.saturating_sub(now.saturating_duration_since(started)))
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
mod tests;
