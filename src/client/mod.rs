//! The BITS upload client (`bitsfarm upload`): the client state machine of [MC-BUP] 3.1 as Windows
//! runs it. Create-Session with protocol negotiation, Ping after a `BITS-Host-Id`, fragments that
//! follow `BITS-Received-Content-Range`, a restart from zero on `BG_E_SESSION_NOT_FOUND`, the host-id
//! fallback timer, retries of transient errors until a no-progress timeout, upload-reply, and a job
//! file next to the upload so that a later run resumes where this one stopped.

pub mod job;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, Url};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::bits::protocol::{BITS_1_5_UPLOAD_PROTOCOL, header, hresult, parse_hresult};
use job::JobFile;

/// Windows never shrinks fragments below 5 KB on 413 ([MC-BUP] <10>).
const MIN_FRAGMENT: u64 = 5 * 1024;
const REPLY_CHUNK: u64 = 1 << 20;

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
    Session { id: String, host_id: Option<String> },
    Progress { offset: u64, total: u64 },
    Restart { reason: String },
    Fallback { url: String },
    Retry { error: String, delay_s: u64 },
    Reply { bytes: u64 },
}

/// A packet that got no answer: the connection failed or broke, or the answer did not come in time.
#[derive(Debug)]
struct NoAnswer {
    message: String,
    /// The connection was never made, so none of the packet went on the wire.
    unsent: bool,
}

impl From<NoAnswer> for String {
    fn from(e: NoAnswer) -> String {
        e.message
    }
}

/// One Ack as the client sees it.
#[derive(Debug)]
struct Ack {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
}

impl Ack {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    }
    fn error_code(&self) -> Option<u32> {
        self.get(header::ERROR_CODE)
            .or_else(|| self.get(header::ERROR_CODE_SPEC))
            .and_then(parse_hresult)
    }
    fn received(&self) -> Option<u64> {
        self.get(header::RECEIVED_CONTENT_RANGE)?.parse().ok()
    }
    fn describe(&self) -> String {
        format!(
            "HTTP {} code {}",
            self.status.as_u16(),
            self.get(header::ERROR_CODE).unwrap_or("-")
        )
    }
}

/// How the client reacts to an answer ([MC-BUP] 3.1.5, W32 bits-return-values).
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    SessionLost,
    Shrink,
    Transient,
    Fatal,
}

fn classify(ack: &Ack) -> Verdict {
    let s = ack.status.as_u16();
    let code = ack.error_code();
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

fn refused(ack: &Ack, what: &str) -> ClientError {
    ClientError::Refused {
        status: ack.status.as_u16(),
        code: ack.get(header::ERROR_CODE).unwrap_or("-").to_string(),
        context: ack.get(header::ERROR_CONTEXT).unwrap_or("-").to_string(),
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

pub struct Uploader {
    http: reqwest::Client,
    opts: UploadOptions,
}

struct Session {
    id: String,
    /// Where packets go: the original URL, or the host named by BITS-Host-Id.
    target: Url,
    host_id: Option<String>,
    fallback_timeout: Option<Duration>,
    /// When the first error since the last progress happened, while a host id is in use.
    fallback_started: Option<Instant>,
}

impl Uploader {
    pub fn new(opts: UploadOptions) -> Result<Self, ClientError> {
        crate::server::tls::install_ring_provider();
        let mut builder = reqwest::Client::builder();
        if !opts.keep_alive {
            builder = builder.pool_max_idle_per_host(0);
        }
        let http = builder
            .user_agent(concat!("bitsfarm-upload/", env!("CARGO_PKG_VERSION")))
            .timeout(opts.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot set up HTTP: {e}")))?;
        if opts.fragment_size < 1 {
            return Err(ClientError::Usage(
                "--fragment-size must be at least 1".into(),
            ));
        }
        Ok(Uploader { http, opts })
    }

    async fn packet(
        &self,
        url: &Url,
        packet: &str,
        session: Option<&str>,
        extra: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Ack, NoAnswer> {
        let method = Method::from_bytes(b"BITS_POST").map_err(|e| NoAnswer {
            message: e.to_string(),
            unsent: true,
        })?;
        let mut req = self
            .http
            .request(method, url.clone())
            .header(header::PACKET_TYPE, packet)
            .header(reqwest::header::CONTENT_LENGTH, body.len());
        if let Some(id) = session {
            req = req.header(header::SESSION_ID, id);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        let resp = req.body(body).send().await.map_err(|e| {
            let mut message = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                message.push_str(": ");
                message.push_str(&s.to_string());
                src = s.source();
            }
            NoAnswer {
                message,
                unsent: e.is_connect(),
            }
        })?;
        let ack = Ack {
            status: resp.status(),
            headers: resp.headers().clone(),
        };
        debug!(%url, packet, status = ack.status.as_u16(), code = ?ack.get(header::ERROR_CODE), "ack");
        Ok(ack)
    }

    async fn create_session(
        &self,
        url: &Url,
        name: Option<&str>,
    ) -> Result<Result<Session, Ack>, String> {
        let mut extra = vec![(
            header::SUPPORTED_PROTOCOLS,
            BITS_1_5_UPLOAD_PROTOCOL.to_string(),
        )];
        if let Some(n) = name {
            extra.push((header::CONTENT_NAME, n.to_string()));
        }
        let ack = self
            .packet(url, "Create-Session", None, &extra, Vec::new())
            .await?;
        if classify(&ack) != Verdict::Ok {
            return Ok(Err(ack));
        }
        let Some(id) = ack.get(header::SESSION_ID).map(str::to_string) else {
            return Err("Create-Session was answered without BITS-Session-Id".into());
        };
        let proto = ack.get(header::PROTOCOL).unwrap_or("");
        if !proto
            .trim_matches(|c| c == '{' || c == '}')
            .eq_ignore_ascii_case(BITS_1_5_UPLOAD_PROTOCOL.trim_matches(|c| c == '{' || c == '}'))
        {
            return Err(format!("the server chose an unknown protocol {proto:?}"));
        }
        let host_id = ack
            .get(header::HOST_ID)
            .filter(|h| !h.is_empty())
            .map(str::to_string);
        let target = match &host_id {
            Some(h) => url_for_host(url, h)?,
            None => url.clone(),
        };
        let fallback_timeout = ack
            .get(header::HOST_ID_FALLBACK_TIMEOUT)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        Ok(Ok(Session {
            id,
            target,
            host_id,
            fallback_timeout,
            fallback_started: None,
        }))
    }

    /// Uploads `file` to `url`. `events` sees progress; `interrupted` is polled between packets.
    pub async fn upload(
        &self,
        file: &Path,
        url: &Url,
        mut events: impl FnMut(Event),
        interrupted: impl Fn() -> bool,
    ) -> Result<UploadReport, ClientError> {
        let local = |source| ClientError::Local {
            path: file.to_path_buf(),
            source,
        };
        let meta = tokio::fs::metadata(file).await.map_err(local)?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!(
                "{} is not a file",
                file.display()
            )));
        }
        let size = meta.len();
        let mtime = job::mtime_secs(&meta);
        let mut reader = FragmentReader::open(file).map_err(local)?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string);
        let mut report = UploadReport {
            bytes: size,
            ..Default::default()
        };
        let mut fragment_size = self.opts.fragment_size;
        let mut last_progress = Instant::now();
        let mut last_error = String::new();
        let mut offset = 0u64;

        // A job file from an earlier run of the same upload: resume its session.
        let mut session: Option<Session> = None;
        if let Some(jp) = &self.opts.job_file
            && let Some(j) = JobFile::load(jp)
        {
            if j.matches(url, size, mtime) {
                info!(session = %j.session_id, offset = j.offset, "resuming the job of an earlier run");
                offset = j.offset;
                report.resumed = true;
                report.sessions += 1;
                session = Some(Session {
                    id: j.session_id.clone(),
                    target: Url::parse(&j.target).unwrap_or_else(|_| url.clone()),
                    host_id: j.host_id.clone(),
                    fallback_timeout: j.fallback_timeout_s.map(Duration::from_secs),
                    fallback_started: None,
                });
            } else {
                warn!(job = %jp.display(), "the job file is for another URL or an older version of the file; starting over");
                JobFile::remove(jp);
            }
        }

        loop {
            if interrupted() {
                return Err(ClientError::Interrupted);
            }
            if last_progress.elapsed() > self.opts.no_progress_timeout {
                return Err(ClientError::NoProgress(
                    self.opts.no_progress_timeout,
                    last_error,
                ));
            }
            // Create-Session (and Ping the host it names) when there is no session.
            let Some(s) = session.as_mut() else {
                match self.create_session(url, name.as_deref()).await {
                    Ok(Ok(s)) => {
                        report.sessions += 1;
                        offset = 0;
                        events(Event::Session {
                            id: s.id.clone(),
                            host_id: s.host_id.clone(),
                        });
                        if s.host_id.is_some() {
                            // Windows pings the host id first; a failure shows up on the first fragment.
                            let _ = self.packet(&s.target, "Ping", None, &[], Vec::new()).await;
                        }
                        report.session_id = s.id.clone();
                        report.host_id = s.host_id.clone();
                        self.save_job(url, size, mtime, &s, offset);
                        session = Some(s);
                    }
                    Ok(Err(ack)) => match classify(&ack) {
                        Verdict::Fatal | Verdict::Shrink => {
                            return Err(refused(&ack, "Create-Session was refused"));
                        }
                        _ => {
                            last_error = ack.describe();
                            self.wait_retry(&mut report, &mut events, &last_error).await;
                        }
                    },
                    Err(e) => {
                        last_error = e;
                        self.wait_retry(&mut report, &mut events, &last_error).await;
                    }
                }
                continue;
            };

            if offset >= size && !(size == 0 && report.bytes_sent == 0 && !report.resumed) {
                break;
            }
            // One fragment from `offset`.
            let end = (offset + fragment_size).min(size);
            let (range, body) = if size == 0 {
                ("bytes */0".to_string(), Vec::new())
            } else {
                let buf = reader.read(offset, end).await.map_err(local)?;
                // Read the next fragment from disk while this one is on the wire.
                reader.prefetch(end, (end + fragment_size).min(size));
                (format!("bytes {}-{}/{}", offset, end - 1, size), buf)
            };
            let sent = body.len() as u64;
            let mut extra = vec![("content-range", range)];
            if let Some(n) = &name {
                extra.push((header::CONTENT_NAME, n.clone()));
            }
            let result = self
                .packet(&s.target, "Fragment", Some(&s.id), &extra, body)
                .await;
            if !matches!(&result, Err(e) if e.unsent) {
                report.bytes_sent += sent;
            }
            match result {
                Ok(ack) => match classify(&ack) {
                    Verdict::Ok => {
                        let next = ack.received().unwrap_or(end);
                        if next > offset || size == 0 {
                            last_progress = Instant::now();
                        }
                        offset = next.min(size);
                        s.fallback_started = None;
                        events(Event::Progress {
                            offset,
                            total: size,
                        });
                        self.save_job(url, size, mtime, s, offset);
                        if offset >= size {
                            let reply_url = ack.get(header::REPLY_URL).map(str::to_string);
                            if let Some(out) = &self.opts.reply {
                                let Some(ru) = reply_url else {
                                    return Err(refused(
                                        &ack,
                                        "upload-reply: the final Ack carried no BITS-Reply-URL",
                                    ));
                                };
                                let n = self.download_reply(&s.target, &ru, out).await?;
                                report.reply_bytes = Some(n);
                                events(Event::Reply { bytes: n });
                            }
                            break;
                        }
                    }
                    Verdict::SessionLost => {
                        report.restarts += 1;
                        events(Event::Restart {
                            reason: "the server does not know the session (BG_E_SESSION_NOT_FOUND)"
                                .into(),
                        });
                        session = None;
                        offset = 0;
                    }
                    Verdict::Shrink => {
                        fragment_size = (fragment_size / 2).max(MIN_FRAGMENT);
                    }
                    Verdict::Fatal if ack.status.as_u16() == 416 => {
                        // Out of sync: jump to where the server is.
                        if let Some(next) = ack.received() {
                            offset = next.min(size);
                        }
                    }
                    Verdict::Fatal => return Err(refused(&ack, "a fragment was refused")),
                    Verdict::Transient => {
                        last_error = ack.describe();
                        self.transient(s, url, &mut report, &mut events, &last_error)
                            .await;
                    }
                },
                Err(e) => {
                    last_error = e.into();
                    self.transient(s, url, &mut report, &mut events, &last_error)
                        .await;
                }
            }
        }

        // Close-Session, retried on 5xx other than "session not found" (W32 ack-for-close-session).
        let Some(s) = session else {
            return Err(ClientError::Usage("no session to close".into()));
        };
        loop {
            if last_progress.elapsed() > self.opts.no_progress_timeout {
                return Err(ClientError::NoProgress(
                    self.opts.no_progress_timeout,
                    last_error,
                ));
            }
            match self
                .packet(&s.target, "Close-Session", Some(&s.id), &[], Vec::new())
                .await
            {
                Ok(ack) if classify(&ack) == Verdict::Ok => break,
                Ok(ack) if classify(&ack) == Verdict::SessionLost => {
                    // A retried Close whose first attempt succeeded; the upload is in place.
                    warn!(
                        "Close-Session: the server no longer knows the session; assuming an earlier Close succeeded"
                    );
                    break;
                }
                Ok(ack) if ack.status.is_server_error() || ack.status.as_u16() == 408 => {
                    last_error = ack.describe();
                    self.wait_retry(&mut report, &mut events, &last_error).await;
                }
                Ok(ack) => return Err(refused(&ack, "Close-Session was refused")),
                Err(e) => {
                    last_error = e.into();
                    self.wait_retry(&mut report, &mut events, &last_error).await;
                }
            }
        }
        if let Some(jp) = &self.opts.job_file {
            JobFile::remove(jp);
        }
        Ok(report)
    }

    /// Cancels the job named by the job file (Ctrl-C with --cancel-on-interrupt).
    pub async fn cancel(&self, url: &Url) -> bool {
        let Some(jp) = &self.opts.job_file else {
            return false;
        };
        let Some(j) = JobFile::load(jp) else {
            return false;
        };
        let target = Url::parse(&j.target).unwrap_or_else(|_| url.clone());
        let ok = matches!(
            self.packet(&target, "Cancel-Session", Some(&j.session_id), &[], Vec::new()).await,
            Ok(ack) if ack.status.is_success()
        );
        JobFile::remove(jp);
        ok
    }

    async fn transient(
        &self,
        s: &mut Session,
        url: &Url,
        report: &mut UploadReport,
        events: &mut impl FnMut(Event),
        error: &str,
    ) {
        if s.host_id.is_some() && s.target != *url {
            let started = *s.fallback_started.get_or_insert_with(Instant::now);
            // No header means "never fall back" ([MC-BUP] 3.1.5.1.7).
            if let Some(t) = s.fallback_timeout
                && started.elapsed() >= t
            {
                info!(url = %url, "host-id fallback timeout passed; going back to the original URL");
                s.target = url.clone();
                report.fallbacks += 1;
                events(Event::Fallback {
                    url: url.to_string(),
                });
                return;
            }
        }
        self.wait_retry(report, events, error).await;
    }

    async fn wait_retry(
        &self,
        report: &mut UploadReport,
        events: &mut impl FnMut(Event),
        error: &str,
    ) {
        report.retries += 1;
        events(Event::Retry {
            error: error.to_string(),
            delay_s: self.opts.retry_delay.as_secs(),
        });
        tokio::time::sleep(self.opts.retry_delay).await;
    }

    fn save_job(&self, url: &Url, size: u64, mtime: u64, s: &Session, offset: u64) {
        if let Some(jp) = &self.opts.job_file {
            JobFile {
                url: url.to_string(),
                size,
                mtime,
                session_id: s.id.clone(),
                target: s.target.to_string(),
                host_id: s.host_id.clone(),
                fallback_timeout_s: s.fallback_timeout.map(|d| d.as_secs()),
                offset,
            }
            .save(jp);
        }
    }

    /// Downloads the reply with ranged GETs, as Windows does, into `out`.
    async fn download_reply(
        &self,
        base: &Url,
        reply_url: &str,
        out: &Path,
    ) -> Result<u64, ClientError> {
        let url = base.join(&reply_url.replace('\\', "/")).map_err(|e| {
            ClientError::Usage(format!("BITS-Reply-URL {reply_url:?} is not a URL: {e}"))
        })?;
        let local = |source| ClientError::Local {
            path: out.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(out).await.map_err(local)?;
        let mut at = 0u64;
        let mut total: Option<u64> = None;
        for _ in 0..1_000_000 {
            if total.is_some_and(|t| at >= t) {
                break;
            }
            let resp = self
                .http
                .get(url.clone())
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", at, at + REPLY_CHUNK - 1),
                )
                .send()
                .await
                .map_err(|e| ClientError::Refused {
                    status: 0,
                    code: "-".into(),
                    context: "-".into(),
                    message: format!("reply download from {url}: {e}"),
                })?;
            let status = resp.status().as_u16();
            let refused = |m: String| ClientError::Refused {
                status,
                code: "-".into(),
                context: "-".into(),
                message: m,
            };
            match status {
                206 => {
                    total = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit_once('/'))
                        .and_then(|(_, t)| t.parse().ok());
                    let bytes = resp.bytes().await.map_err(|e| refused(e.to_string()))?;
                    if bytes.is_empty() {
                        break;
                    }
                    file.write_all(&bytes).await.map_err(local)?;
                    at += bytes.len() as u64;
                }
                200 => {
                    // The whole reply at once (a server without Range support).
                    let bytes = resp.bytes().await.map_err(|e| refused(e.to_string()))?;
                    file.write_all(&bytes).await.map_err(local)?;
                    at = bytes.len() as u64;
                    break;
                }
                416 => break, // an empty reply
                _ => {
                    return Err(refused(format!(
                        "reply download from {url} answered {status}"
                    )));
                }
            }
        }
        file.flush().await.map_err(local)?;
        Ok(at)
    }
}

/// Reads fragments of the upload with positioned reads on a blocking thread, one fragment ahead:
/// the next fragment comes off the disk while the current one is being sent.
struct FragmentReader {
    file: std::sync::Arc<std::fs::File>,
    ahead: Option<ReadAhead>,
}

/// The fragment being read ahead: its byte range and the read in progress.
type ReadAhead = (u64, u64, tokio::task::JoinHandle<std::io::Result<Vec<u8>>>);

impl FragmentReader {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(FragmentReader {
            file: std::sync::Arc::new(std::fs::File::open(path)?),
            ahead: None,
        })
    }

    fn spawn(&self, from: u64, to: u64) -> tokio::task::JoinHandle<std::io::Result<Vec<u8>>> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; (to - from) as usize];
            file.read_exact_at(&mut buf, from)?;
            Ok(buf)
        })
    }

    /// The bytes `from..to`: the prefetched ones when they are these, else read now.
    async fn read(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        let task = match self.ahead.take() {
            Some((a, b, t)) if (a, b) == (from, to) => t,
            Some((_, _, t)) => {
                // The server asked for other bytes (a resend, a smaller fragment): drop it.
                t.abort();
                self.spawn(from, to)
            }
            None => self.spawn(from, to),
        };
        task.await.map_err(std::io::Error::other)?
    }

    fn prefetch(&mut self, from: u64, to: u64) {
        if let Some((_, _, t)) = self.ahead.take() {
            t.abort();
        }
        if to > from {
            self.ahead = Some((from, to, self.spawn(from, to)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(status: u16, code: Option<&str>) -> Ack {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(c) = code {
            headers.insert("bits-error-code", c.parse().unwrap());
        }
        Ack {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
        }
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
}
