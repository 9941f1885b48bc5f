//! The BITS upload client (`bitsfarm upload`): the client state machine of [MC-BUP] 3.1 as Windows
//! runs it. Create-Session with protocol negotiation, Ping after a `BITS-Host-Id`, fragments that
//! follow `BITS-Received-Content-Range`, a restart from zero on `BG_E_SESSION_NOT_FOUND`, the host-id
//! fallback timer, retries of transient errors until a no-progress timeout, upload-reply, and a job
//! file next to the upload so that a later run resumes where this one stopped.
//!
//! - `machine`: the rules, pure: what an answer means, where packets go, what to send next.
//! - `uploader`: the I/O loop (HTTP, the file, the job file, events) that acts on them.
//! - `job`: the job file.

pub mod job;
pub mod machine;
mod uploader;

use std::path::PathBuf;
use std::time::Duration;

pub use uploader::Uploader;

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub fragment_size: u64,
    /// Wait before retrying a transient error (Windows: MinimumRetryDelay, 600 s by default).
    pub retry_delay: Duration,
    /// Give up after this long without progress (Windows: NoProgressTimeout, 14 days by default).
    pub no_progress_timeout: Duration,
    /// Upload-reply: where to write the server application's reply.
    pub reply: Option<PathBuf>,
    /// Where the job is remembered between runs; None: no resume across runs.
    pub job_file: Option<PathBuf>,
    /// Per request: how long to wait for an answer.
    pub request_timeout: Duration,
    /// Reuse connections between packets (as Windows does). Off: a new connection per packet,
    /// which behind a load balancer lands packets on any member.
    pub keep_alive: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            fragment_size: 8 << 20,
            retry_delay: Duration::from_secs(5),
            no_progress_timeout: Duration::from_secs(300),
            reply: None,
            job_file: None,
            request_timeout: Duration::from_secs(300),
            keep_alive: true,
        }
    }
}

/// What happened during an upload, for the user and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadReport {
    pub bytes: u64,
    /// Bytes put on the wire in fragments, resends included.
    pub bytes_sent: u64,
    /// Sessions created (1 when nothing went wrong).
    pub sessions: u32,
    /// Times the upload started again from zero because the server lost the session.
    pub restarts: u32,
    /// Times the client gave up on the host id and went back to the original URL.
    pub fallbacks: u32,
    pub retries: u32,
    pub session_id: String,
    pub host_id: Option<String>,
    pub reply_bytes: Option<u64>,
    pub resumed: bool,
    /// The upload URL's path, percent-decoded: the name the server files the upload under (below
    /// the data folder of the upload directory that serves it, or at its backend). The client
    /// cannot know the server's folders, so this is as far as it can say by itself.
    pub url_path: String,
    /// The reply URL the final Ack named: the server handed the upload to its backend (server
    /// application). None when it did not, or when the final Ack came in an earlier run.
    pub reply_url: Option<String>,
    /// The backend's reply, when it was downloaded (`--reply`) and is one short line of text
    /// (the reference receiver's says where it stored the file).
    pub backend_reply: Option<String>,
    /// This run saw the final Ack, so a missing `reply_url` means no backend was involved.
    #[serde(skip)]
    pub final_ack_seen: bool,
}

/// The longest reply shown in the summary; a longer one is data, not a message.
const SHOWN_REPLY_BYTES: usize = 512;

impl UploadReport {
    /// The lines `bitsfarm upload` prints when done: what was sent, in which session, and where
    /// the upload went, as far as the client can know it.
    pub fn summary(&self, url: &reqwest::Url) -> String {
        let mut out = format!(
            "uploaded {} bytes to {url} (session {}",
            self.bytes, self.session_id
        );
        if let Some(h) = &self.host_id {
            out.push_str(&format!(", host {h}"));
        }
        if self.resumed {
            out.push_str(", resumed");
        }
        out.push_str(&format!(
            ", {} restarts, {} bytes sent)\non the server: {}",
            self.restarts, self.bytes_sent, self.url_path
        ));
        match (&self.reply_url, &self.backend_reply) {
            (Some(_), Some(said)) => {
                out.push_str(&format!(", handed to its backend, which replied: {said}"))
            }
            (Some(_), None) if self.reply_bytes.is_some() => {
                out.push_str(", handed to its backend (its reply is in the --reply file)")
            }
            (Some(_), None) => {
                out.push_str(", handed to its backend (--reply FILE downloads the backend's reply)")
            }
            (None, _) if self.final_ack_seen => {
                out.push_str(", in the data folder of the upload directory that serves it")
            }
            (None, _) => {}
        }
        out
    }
}

/// A reply worth showing as a message: one short line of text.
pub fn reply_as_message(bytes: &[u8]) -> Option<String> {
    if bytes.len() > SHOWN_REPLY_BYTES {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    (!text.is_empty() && !text.chars().any(char::is_control)).then(|| text.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error(
        "the server refused the upload: HTTP {status}, BITS-Error-Code {code}, context {context}: {message}"
    )]
    Refused {
        status: u16,
        code: String,
        context: String,
        message: String,
    },
    #[error("no progress for {0:?}; last error: {1}")]
    NoProgress(Duration, String),
    #[error("interrupted")]
    Interrupted,
}

impl ClientError {
    /// Exit codes scripts can use.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Refused { .. } => 1,
            ClientError::Usage(_) | ClientError::Local { .. } => 2,
            ClientError::NoProgress(..) => 3,
            ClientError::Interrupted => 4,
        }
    }
}

/// Progress events, for a progress bar or JSON lines.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Session {
        id: String,
        host_id: Option<String>,
    },
    Progress {
        offset: u64,
        total: u64,
    },
    Restart {
        reason: String,
    },
    Fallback {
        url: String,
    },
    Retry {
        error: String,
        delay_s: u64,
    },
    /// Packets go to the host the session's host id names, and it does not answer: the client
    /// tries it again (`retry`, counted since the last progress) until the fallback timer runs
    /// out in `falls_back_in_s` (None: the server set no timeout, and the client never falls back).
    Waiting {
        host: String,
        retry: u32,
        falls_back_in_s: Option<u64>,
    },
    Reply {
        bytes: u64,
    },
}

impl Event {
    /// The event in words, for the progress line; None for those the bar itself shows.
    pub fn describe(&self) -> Option<String> {
        Some(match self {
            Event::Waiting {
                host,
                retry,
                falls_back_in_s: Some(t),
            } => format!("waiting for host {host} (retry {retry}, falls back in {t} s)"),
            Event::Waiting { host, retry, .. } => {
                format!("waiting for host {host} (retry {retry}, never falls back)")
            }
            Event::Retry { error, delay_s } => format!("retrying in {delay_s} s: {error}"),
            Event::Restart { reason } => format!("restarted from zero: {reason}"),
            Event::Fallback { url } => format!("fell back to {url}"),
            Event::Session { .. } | Event::Progress { .. } | Event::Reply { .. } => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_says_for_which_host_how_often_and_until_when() {
        let waiting = |t| Event::Waiting {
            host: "10.0.0.7:8080".into(),
            retry: 3,
            falls_back_in_s: t,
        };
        assert_eq!(
            waiting(Some(27)).describe().unwrap(),
            "waiting for host 10.0.0.7:8080 (retry 3, falls back in 27 s)"
        );
        assert_eq!(
            waiting(None).describe().unwrap(),
            "waiting for host 10.0.0.7:8080 (retry 3, never falls back)"
        );
        assert_eq!(
            serde_json::to_value(waiting(Some(27))).unwrap(),
            serde_json::json!({"event": "waiting", "host": "10.0.0.7:8080", "retry": 3, "falls_back_in_s": 27})
        );
        let progress = Event::Progress {
            offset: 1,
            total: 2,
        };
        assert_eq!(progress.describe(), None);
    }

    fn report() -> UploadReport {
        UploadReport {
            bytes: 10,
            bytes_sent: 10,
            sessions: 1,
            session_id: "{S}".into(),
            url_path: "/dumps/app.dmp".into(),
            final_ack_seen: true,
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_says_where_the_upload_went_as_far_as_the_client_knows() {
        let url = reqwest::Url::parse("http://h:8/dumps/app.dmp").unwrap();
        let plain = report().summary(&url);
        assert_eq!(
            plain,
            "uploaded 10 bytes to http://h:8/dumps/app.dmp (session {S}, 0 restarts, 10 bytes sent)\n\
             on the server: /dumps/app.dmp, in the data folder of the upload directory that serves it"
        );
        let resumed = UploadReport {
            host_id: Some("h:9".into()),
            resumed: true,
            final_ack_seen: false,
            ..report()
        };
        let text = resumed.summary(&url);
        assert!(text.contains("(session {S}, host h:9, resumed,"), "{text}");
        assert!(text.ends_with("on the server: /dumps/app.dmp"), "{text}");
        let delivered = UploadReport {
            reply_url: Some("http://h:8/dumps/BITS-Sessions/Replies/{S}".into()),
            ..report()
        };
        assert!(
            delivered
                .summary(&url)
                .ends_with("handed to its backend (--reply FILE downloads the backend's reply)")
        );
        let said = UploadReport {
            reply_bytes: Some(20),
            backend_reply: Some("stored 10 bytes as dumps/app.dmp".into()),
            ..delivered
        };
        assert!(
            said.summary(&url).ends_with(
                "handed to its backend, which replied: stored 10 bytes as dumps/app.dmp"
            )
        );
    }

    #[test]
    fn only_a_short_line_of_text_is_shown_as_the_backends_reply() {
        assert_eq!(reply_as_message(b"stored\n").as_deref(), Some("stored"));
        assert_eq!(reply_as_message(b""), None);
        assert_eq!(reply_as_message(b"two\nlines"), None);
        assert_eq!(reply_as_message(&[0xff, 0xfe]), None);
        assert_eq!(reply_as_message(&[b'a'; 513]), None);
    }
}
