//! The upload's I/O: HTTP, the file, the job file and events, in short named steps (create a
//! session, send a fragment, close, download the reply). What an answer means and what to send
//! next is `machine.rs`'s to say; this file only acts on it.

use std::path::Path;
use std::time::Instant;

use reqwest::{Method, StatusCode, Url};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::job::{self, JobFile};
use super::machine::{
    Answer, Closed, Created, Fragmented, Session, Transfer, after_close, after_create, refusal,
    reply_range, reply_total, reply_url,
};
use super::{ClientError, Event, UploadOptions, UploadReport};
use crate::bits::protocol::{
    BITS_1_5_UPLOAD_PROTOCOL, BITS_POST, FragmentRange, PacketType, header,
};

pub struct Uploader {
    http: reqwest::Client,
    opts: UploadOptions,
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

impl NoAnswer {
    fn of(e: reqwest::Error) -> NoAnswer {
        // reqwest's message alone rarely says why ("error sending request"); the causes do.
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
    }
}

/// One Ack as the client sees it: the status and headers reqwest gave.
#[derive(Debug)]
struct Ack {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
}

impl Answer for Ack {
    fn status(&self) -> u16 {
        self.status.as_u16()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    }
}

/// A local file the upload cannot read or write.
fn local(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Local {
        path: path.to_path_buf(),
        source,
    }
}

impl Uploader {
    pub fn new(opts: UploadOptions) -> Result<Self, ClientError> {
        crate::tls::install_ring_provider();
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

    /// Sends one BITS_POST packet and returns its answer.
    async fn packet(
        &self,
        url: &Url,
        packet: PacketType,
        session: Option<&str>,
        extra: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Ack, NoAnswer> {
        let method = Method::from_bytes(BITS_POST.as_bytes()).map_err(|e| NoAnswer {
            message: e.to_string(),
            unsent: true,
        })?;
        let mut req = self
            .http
            .request(method, url.clone())
            .header(header::PACKET_TYPE, packet.as_str())
            .header(reqwest::header::CONTENT_LENGTH, body.len());
        if let Some(id) = session {
            req = req.header(header::SESSION_ID, id);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        let resp = req.body(body).send().await.map_err(NoAnswer::of)?;
        let ack = Ack {
            status: resp.status(),
            headers: resp.headers().clone(),
        };
        let packet = packet.as_str();
        debug!(%url, packet, status = ack.status.as_u16(), code = ?ack.header(header::ERROR_CODE), "ack");
        Ok(ack)
    }

    /// Uploads `file` to `url`. `events` sees progress; `interrupted` is polled between packets.
    pub async fn upload(
        &self,
        file: &Path,
        url: &Url,
        events: impl FnMut(Event),
        interrupted: impl Fn() -> bool,
    ) -> Result<UploadReport, ClientError> {
        let mut run = Run::open(self, file, url, events).await?;
        let mut session = run.resume_job();
        let mut session = loop {
            if interrupted() {
                return Err(ClientError::Interrupted);
            }
            run.check_progress()?;
            let Some(mut s) = session.take() else {
                session = run.create_session().await?;
                continue;
            };
            if !run.transfer.has_more(run.report.resumed) {
                break s;
            }
            match run.send_fragment(&mut s).await? {
                Sent::More => session = Some(s),
                Sent::Last => break s,
                // The next turn creates a new session.
                Sent::SessionLost => {}
            }
        };
        run.close(&mut session).await?;
        if let Some(jp) = &self.opts.job_file {
            JobFile::remove(jp);
        }
        Ok(run.report)
    }

    /// Cancels the job named by the job file (Ctrl-C with --cancel-on-interrupt).
    pub async fn cancel(&self, url: &Url) -> bool {
        let Some(jp) = &self.opts.job_file else {
            return false;
        };
        let Some(j) = JobFile::load(jp) else {
            return false;
        };
        let s = j.session(url);
        let ok = matches!(
            self.packet(&s.target, PacketType::CancelSession, Some(&s.id), &[], Vec::new()).await,
            Ok(ack) if ack.status.is_success()
        );
        JobFile::remove(jp);
        ok
    }

    /// Downloads the reply with ranged GETs, as Windows does, into `out`.
    async fn download_reply(
        &self,
        base: &Url,
        reply: &str,
        out: &Path,
    ) -> Result<u64, ClientError> {
        let url = reply_url(base, reply).map_err(ClientError::Usage)?;
        let mut file = tokio::fs::File::create(out).await.map_err(local(out))?;
        let mut at = 0u64;
        let mut total: Option<u64> = None;
        for _ in 0..1_000_000 {
            if total.is_some_and(|t| at >= t) {
                break;
            }
            let resp = self
                .http
                .get(url.clone())
                .header(reqwest::header::RANGE, reply_range(at))
                .send()
                .await
                .map_err(|e| reply_error(0, format!("reply download from {url}: {e}")))?;
            let status = resp.status().as_u16();
            match status {
                206 => {
                    total = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(reply_total);
                    let bytes = resp.bytes().await.map_err(|e| reply_error(status, e))?;
                    if bytes.is_empty() {
                        break;
                    }
                    file.write_all(&bytes).await.map_err(local(out))?;
                    at += bytes.len() as u64;
                }
                200 => {
                    // The whole reply at once (a server without Range support).
                    let bytes = resp.bytes().await.map_err(|e| reply_error(status, e))?;
                    file.write_all(&bytes).await.map_err(local(out))?;
                    at = bytes.len() as u64;
                    break;
                }
                416 => break, // an empty reply
                _ => {
                    let why = format!("reply download from {url} answered {status}");
                    return Err(reply_error(status, why));
                }
            }
        }
        file.flush().await.map_err(local(out))?;
        Ok(at)
    }
}

/// The reply download failed: the upload itself is in place, but what the user asked for is not.
fn reply_error(status: u16, message: impl ToString) -> ClientError {
    ClientError::Refused {
        status,
        code: "-".into(),
        context: "-".into(),
        message: message.to_string(),
    }
}

/// What became of a fragment, for the loop in `upload`.
enum Sent {
    /// Go on in the same session (the next fragment, or this one again).
    More,
    /// The server has the whole upload.
    Last,
    SessionLost,
}

/// One call of `upload`: the file, where the upload stands, and what has happened so far.
struct Run<'a, E> {
    up: &'a Uploader,
    url: &'a Url,
    file: &'a Path,
    name: Option<String>,
    mtime: u64,
    reader: FragmentReader,
    transfer: Transfer,
    report: UploadReport,
    last_progress: Instant,
    last_error: String,
    /// Tries at the session's host since the last progress, for the waiting event.
    host_retries: u32,
    events: E,
}

impl<'a, E: FnMut(Event)> Run<'a, E> {
    async fn open(
        up: &'a Uploader,
        file: &'a Path,
        url: &'a Url,
        events: E,
    ) -> Result<Self, ClientError> {
        let meta = tokio::fs::metadata(file).await.map_err(local(file))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!(
                "{} is not a file",
                file.display()
            )));
        }
        let size = meta.len();
        Ok(Run {
            up,
            url,
            file,
            name: file
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string),
            mtime: job::mtime_secs(&meta),
            reader: FragmentReader::open(file).map_err(local(file))?,
            transfer: Transfer::new(size, up.opts.fragment_size),
            report: UploadReport {
                bytes: size,
                url_path: percent_encoding::percent_decode_str(url.path())
                    .decode_utf8_lossy()
                    .into_owned(),
                ..Default::default()
            },
            last_progress: Instant::now(),
            last_error: String::new(),
            host_retries: 0,
            events,
        })
    }

    /// The session of a job file from an earlier run of the same upload, to resume.
    fn resume_job(&mut self) -> Option<Session> {
        let jp = self.up.opts.job_file.as_ref()?;
        let j = JobFile::load(jp)?;
        if !j.matches(self.url, self.transfer.size, self.mtime) {
            warn!(job = %jp.display(), "the job file is for another URL or an older version of the file; starting over");
            JobFile::remove(jp);
            return None;
        }
        info!(session = %j.session_id, offset = j.offset, "resuming the job of an earlier run");
        self.transfer.offset = j.offset;
        self.report.resumed = true;
        self.report.sessions += 1;
        let s = j.session(self.url);
        self.named(&s);
        Some(s)
    }

    /// The session the upload goes on in, for the report and the events; a resumed one as much
    /// as a new one.
    fn named(&mut self, s: &Session) {
        self.report.session_id = s.id.clone();
        self.report.host_id = s.host_id.clone();
        (self.events)(Event::Session {
            id: s.id.clone(),
            host_id: s.host_id.clone(),
        });
    }

    fn check_progress(&self) -> Result<(), ClientError> {
        let timeout = self.up.opts.no_progress_timeout;
        if self.last_progress.elapsed() > timeout {
            return Err(ClientError::NoProgress(timeout, self.last_error.clone()));
        }
        Ok(())
    }

    fn save_job(&self, s: &Session) {
        if let Some(jp) = &self.up.opts.job_file {
            let (size, offset) = (self.transfer.size, self.transfer.offset);
            JobFile::of(self.url, size, self.mtime, s, offset).save(jp);
        }
    }

    /// Create-Session (and a Ping to the host it names). None: no session this time; the wait
    /// before the next try is over.
    async fn create_session(&mut self) -> Result<Option<Session>, ClientError> {
        let mut extra = vec![(
            header::SUPPORTED_PROTOCOLS,
            BITS_1_5_UPLOAD_PROTOCOL.to_string(),
        )];
        if let Some(n) = &self.name {
            extra.push((header::CONTENT_NAME, n.clone()));
        }
        let create = PacketType::CreateSession;
        let ack = match self
            .up
            .packet(self.url, create, None, &extra, Vec::new())
            .await
        {
            Ok(ack) => ack,
            Err(e) => {
                self.retry_later(e.into()).await;
                return Ok(None);
            }
        };
        match after_create(&ack, self.url) {
            Created::Session(s) => {
                self.began(&s).await;
                Ok(Some(s))
            }
            Created::Retry(why) => {
                self.retry_later(why).await;
                Ok(None)
            }
            Created::Refused => Err(refusal(&ack, "Create-Session was refused")),
        }
    }

    /// A new session: the upload starts from zero in it.
    async fn began(&mut self, s: &Session) {
        self.report.sessions += 1;
        self.transfer.restart();
        self.host_retries = 0;
        self.named(s);
        if s.host_id.is_some() {
            // Windows pings the host id first; a failure shows up on the first fragment.
            let ping = PacketType::Ping;
            let _ = self.up.packet(&s.target, ping, None, &[], Vec::new()).await;
        }
        self.save_job(s);
    }

    /// Sends the next fragment and acts on its answer.
    async fn send_fragment(&mut self, s: &mut Session) -> Result<Sent, ClientError> {
        let range = self.transfer.next_fragment();
        let body = self.read(range).await?;
        let sent = body.len() as u64;
        let mut extra = vec![(reqwest::header::CONTENT_RANGE.as_str(), range.to_string())];
        if let Some(n) = &self.name {
            extra.push((header::CONTENT_NAME, n.clone()));
        }
        let fragment = PacketType::Fragment;
        let result = self
            .up
            .packet(&s.target, fragment, Some(&s.id), &extra, body)
            .await;
        // A connection that was never made put none of the fragment on the wire.
        if !matches!(&result, Err(e) if e.unsent) {
            self.report.bytes_sent += sent;
        }
        match result {
            Ok(ack) => self.fragment_answered(s, &ack, range).await,
            Err(e) => {
                self.transient(s, e.into()).await;
                Ok(Sent::More)
            }
        }
    }

    /// The bytes of `range`, and the next fragment read ahead while this one is on the wire.
    async fn read(&mut self, range: FragmentRange) -> Result<Vec<u8>, ClientError> {
        if range.total == 0 {
            return Ok(Vec::new());
        }
        let buf = self
            .reader
            .read(range.start, range.end)
            .await
            .map_err(local(self.file))?;
        let next = self.transfer.following(range);
        self.reader.prefetch(next.start, next.end);
        Ok(buf)
    }

    async fn fragment_answered(
        &mut self,
        s: &mut Session,
        ack: &Ack,
        range: FragmentRange,
    ) -> Result<Sent, ClientError> {
        match self.transfer.answered(ack, range) {
            Fragmented::Accepted { progress } => {
                if progress {
                    self.last_progress = Instant::now();
                }
                s.progressed();
                self.host_retries = 0;
                (self.events)(Event::Progress {
                    offset: self.transfer.offset,
                    total: self.transfer.size,
                });
                self.save_job(s);
                if !self.transfer.finished() {
                    return Ok(Sent::More);
                }
                self.report.final_ack_seen = true;
                self.report.reply_url = ack
                    .header(header::REPLY_URL)
                    .and_then(|r| reply_url(&s.target, r).ok())
                    .map(String::from);
                self.fetch_reply(s, ack).await?;
                Ok(Sent::Last)
            }
            Fragmented::SessionLost => {
                self.report.restarts += 1;
                (self.events)(Event::Restart {
                    reason: "the server does not know the session (BG_E_SESSION_NOT_FOUND)".into(),
                });
                Ok(Sent::SessionLost)
            }
            Fragmented::Shrunk | Fragmented::Resynced => Ok(Sent::More),
            Fragmented::Refused => Err(refusal(ack, "a fragment was refused")),
            Fragmented::Retry => {
                self.transient(s, ack.describe()).await;
                Ok(Sent::More)
            }
        }
    }

    /// Upload-reply: the final Ack names the reply, which is downloaded where the user asked.
    async fn fetch_reply(&mut self, s: &Session, last: &Ack) -> Result<(), ClientError> {
        let Some(out) = &self.up.opts.reply else {
            return Ok(());
        };
        let Some(reply) = last.header(header::REPLY_URL) else {
            return Err(refusal(
                last,
                "upload-reply: the final Ack carried no BITS-Reply-URL",
            ));
        };
        let n = self.up.download_reply(&s.target, reply, out).await?;
        self.report.reply_bytes = Some(n);
        if n as usize <= super::SHOWN_REPLY_BYTES {
            let bytes = tokio::fs::read(out).await.map_err(local(out))?;
            self.report.backend_reply = super::reply_as_message(&bytes);
        }
        (self.events)(Event::Reply { bytes: n });
        Ok(())
    }

    /// Close-Session, retried until it is answered or the no-progress timeout passes; like any
    /// other packet it falls back to the original URL when its host id stops answering.
    async fn close(&mut self, s: &mut Session) -> Result<(), ClientError> {
        loop {
            self.check_progress()?;
            let close = PacketType::CloseSession;
            let ack = match self
                .up
                .packet(&s.target, close, Some(&s.id), &[], Vec::new())
                .await
            {
                Ok(ack) => ack,
                Err(e) => {
                    self.transient(s, e.into()).await;
                    continue;
                }
            };
            match after_close(&ack) {
                Closed::Yes => return Ok(()),
                Closed::Already => {
                    warn!(
                        "Close-Session: the server no longer knows the session; assuming an earlier Close succeeded"
                    );
                    return Ok(());
                }
                Closed::Retry => self.transient(s, ack.describe()).await,
                Closed::Refused => return Err(refusal(&ack, "Close-Session was refused")),
            }
        }
    }

    /// A transient error in a session: back to the original URL when the host id's fallback
    /// timer has run out (at once, without a wait), else wait and retry.
    async fn transient(&mut self, s: &mut Session, error: String) {
        self.last_error = error;
        let now = Instant::now();
        if s.falls_back(self.url, now) {
            info!(url = %self.url, "host-id fallback timeout passed; going back to the original URL");
            self.report.fallbacks += 1;
            self.host_retries = 0;
            (self.events)(Event::Fallback {
                url: self.url.to_string(),
            });
            return;
        }
        if let Some(host) = s.host_in_use(self.url) {
            self.host_retries += 1;
            (self.events)(Event::Waiting {
                host: host.to_string(),
                retry: self.host_retries,
                falls_back_in_s: s.falls_back_in(now).map(|d| d.as_secs_f64().ceil() as u64),
            });
        }
        self.wait_retry().await;
    }

    async fn retry_later(&mut self, error: String) {
        self.last_error = error;
        self.wait_retry().await;
    }

    async fn wait_retry(&mut self) {
        let delay = self.up.opts.retry_delay;
        self.report.retries += 1;
        (self.events)(Event::Retry {
            error: self.last_error.clone(),
            delay_s: delay.as_secs(),
        });
        tokio::time::sleep(delay).await;
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

    fn ack(headers: &[(&'static str, &str)]) -> Ack {
        let mut map = reqwest::header::HeaderMap::new();
        for &(k, v) in headers {
            map.insert(k, v.parse().unwrap());
        }
        Ack {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: map,
        }
    }

    #[test]
    fn acks_from_reqwest_are_read_trimmed_and_in_either_spelling() {
        let a = ack(&[(header::ERROR_CODE, " 0x8020001F ")]);
        assert_eq!(a.error_code(), Some(0x8020_001F));
        assert_eq!(a.status(), 500);
        let a = ack(&[(header::ERROR_CODE_SPEC, "8020001f")]);
        assert_eq!(a.error_code(), Some(0x8020_001F));
        let a = ack(&[("BITS-Received-Content-Range", "213 ")]);
        assert_eq!(a.received(), Some(213));
        assert_eq!(ack(&[]).describe(), "HTTP 500 code -");
    }

    #[tokio::test]
    async fn the_reader_serves_the_read_ahead_and_drops_a_stale_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut r = FragmentReader::open(&path).unwrap();
        assert_eq!(r.read(0, 4).await.unwrap(), b"0123");
        r.prefetch(4, 8);
        assert_eq!(r.read(4, 8).await.unwrap(), b"4567");
        r.prefetch(8, 10);
        // The server wanted other bytes than the ones read ahead.
        assert_eq!(r.read(2, 5).await.unwrap(), b"234");
        r.prefetch(10, 10);
        assert!(r.ahead.is_none());
        assert!(r.read(8, 12).await.is_err());
    }
}
