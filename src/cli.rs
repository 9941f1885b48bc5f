//! The command line's subcommands, run. `main.rs` only parses.

use std::io::Write;

use anyhow::Context;

use crate::config::{ServeArgs, ServerConfig};
use crate::server::Server;
use crate::shutdown::shutdown_signal;

mod drain;
mod passwd;

pub use drain::{drain, drain_through_admin};
pub use passwd::passwd;

/// `bitsfarm serve`: prints one line naming the address (tests and scripts read it), then serves
/// until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig::from_args(&args)?;
    // Binding may wait for another server to leave the data folder; a pod stopped meanwhile
    // (SIGTERM, or its preStop drain's SIGUSR1) must not wait for that.
    // Biased, signals first: their handlers are installed by that first poll, before bind can
    // log that it waits (which is when a pod's preStop sends SIGUSR1); polled the other way
    // round, a signal in between would meet the default action.
    let server = tokio::select! {
        biased;
        _ = stop_before_serving() => {
            tracing::info!("stopped by a signal before serving");
            return Ok(());
        }
        bound = Server::bind(config.clone()) => bound?,
    };
    let addr = server.local_addr().context("reading the bound address")?;
    let scheme = if config.security.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let mut line = format!("bitsfarm: listening on {scheme}://{addr}");
    if let Some(admin) = server.admin_addr() {
        line.push_str(&format!(" admin http://{admin}"));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    for d in &config.directories {
        tracing::info!(
            upload_path = d.upload_path.as_str(),
            data_dir = %d.data_dir.display(),
            max_upload_size = ?d.max_upload_size,
            session_timeout_s = d.session_timeout.as_secs(),
            notify = ?d.notify_type,
            "upload directory ready"
        );
    }
    tracing::info!(%addr, host_id = ?config.host_id, "serving BITS uploads");
    server.run(shutdown_signal()).await;
    Ok(())
}

/// SIGINT, SIGTERM or SIGUSR1 (drain: a server that serves nothing yet is drained).
async fn stop_before_serving() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut drain) = signal(SignalKind::user_defined1()) {
            tokio::select! {
                _ = shutdown_signal() => {},
                _ = drain.recv() => {},
            }
            return;
        }
    }
    shutdown_signal().await
}

/// `bitsfarm receiver`: prints `bitsfarm receiver: listening on http://ADDR`, then serves.
/// Deliveries by reference are taken only for files beneath `trust_dirs`.
pub async fn receiver(
    listen: std::net::SocketAddr,
    dir: std::path::PathBuf,
    trust_dirs: Vec<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let server = crate::receiver::ReceiverServer::bind(listen, &dir, &trust_dirs).await?;
    let addr = server.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "bitsfarm receiver: listening on http://{addr}")?;
        out.flush()?;
    }
    let trusted = server.trusted();
    if trusted.is_empty() {
        tracing::info!(%addr, dir = %dir.display(), "reference server application ready; by value only (no --trust-dir)");
    } else {
        tracing::info!(%addr, dir = %dir.display(), trusted = ?trusted, "reference server application ready; by reference beneath the trusted folders");
    }
    server.run(shutdown_signal()).await;
    Ok(())
}

/// `bitsfarm upload` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UploadArgs {
    /// The file to upload.
    pub file: std::path::PathBuf,
    /// Where to: the upload URL (http://HOST[:PORT]/PATH).
    pub url: String,
    /// Bytes per fragment (halved on 413, never below 5 KiB).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub fragment_size: u64,
    /// Seconds to wait before retrying a transient error (Windows waits 600).
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub retry_delay: u64,
    /// Give up after this many seconds without progress.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub no_progress_timeout: u64,
    /// Upload-reply: download the server application's reply into FILE before closing.
    #[arg(long, value_name = "FILE")]
    pub reply: Option<std::path::PathBuf>,
    /// Send Cancel-Session on Ctrl-C (default: keep the job to resume on the next run).
    #[arg(long)]
    pub cancel_on_interrupt: bool,
    /// Job file that lets a later run resume [default: FILE.bitsjob].
    #[arg(long, value_name = "PATH")]
    pub job_file: Option<std::path::PathBuf>,
    /// Start from zero even if a job file exists.
    #[arg(long)]
    pub no_resume: bool,
    /// JSON lines on stdout (events and a final report) instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// Open a new connection for every packet instead of keeping one alive.
    #[arg(long)]
    pub no_keep_alive: bool,
}

/// `bitsfarm upload`: returns the exit code: 0 uploaded and closed, 1 refused by the server,
/// 2 bad arguments or local file, 3 no progress before the timeout, 4 interrupted.
pub async fn upload(args: UploadArgs) -> i32 {
    use crate::client::{Event, UploadOptions, Uploader};
    use std::io::IsTerminal;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let url = match reqwest::Url::parse(&args.url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u,
        Ok(u) => {
            eprintln!("bitsfarm upload: {u} is not an http(s) URL");
            return 2;
        }
        Err(e) => {
            eprintln!("bitsfarm upload: {:?} is not a URL: {e}", args.url);
            return 2;
        }
    };
    let job_file = args.job_file.clone().unwrap_or_else(|| {
        let mut p = args.file.as_os_str().to_owned();
        p.push(".bitsjob");
        p.into()
    });
    if args.no_resume {
        crate::client::job::JobFile::remove(&job_file);
    }
    let opts = UploadOptions {
        fragment_size: args.fragment_size,
        retry_delay: std::time::Duration::from_secs(args.retry_delay),
        no_progress_timeout: std::time::Duration::from_secs(args.no_progress_timeout),
        reply: args.reply.clone(),
        job_file: Some(job_file),
        keep_alive: !args.no_keep_alive,
        ..Default::default()
    };
    let uploader = match Uploader::new(opts) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("bitsfarm upload: {e}");
            return e.exit_code();
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut view = (!args.json).then(|| {
        let terminal = std::io::stderr().is_terminal();
        let size = std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0);
        ProgressView::new(terminal.then_some(size))
    });
    let json = args.json;
    let flag = interrupted.clone();
    let result = {
        let upload = uploader.upload(
            &args.file,
            &url,
            |e: Event| {
                if json {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                }
                if let Some(v) = view.as_mut() {
                    v.show(&e);
                }
            },
            move || flag.load(Ordering::SeqCst),
        );
        upload.await
    };
    if let Some(v) = &view {
        v.finish();
    }
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::json!({"event": "done", "report": report}));
            } else {
                eprintln!("{}", report.summary(&url));
            }
            0
        }
        Err(e) => {
            if matches!(e, crate::client::ClientError::Interrupted) && args.cancel_on_interrupt {
                let cancelled = uploader.cancel(&url).await;
                eprintln!("bitsfarm upload: interrupted; job cancelled: {cancelled}");
            } else if matches!(e, crate::client::ClientError::Interrupted) {
                eprintln!("bitsfarm upload: interrupted; run the same command again to resume");
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "failed", "error": e.to_string(), "exit-code": e.exit_code()})
                );
            } else {
                eprintln!("bitsfarm upload: {e}");
            }
            e.exit_code()
        }
    }
}

/// What `bitsfarm upload` shows of its events without `--json`: a progress bar on a terminal, else
/// a plain line on stderr for each event a person has to know about. Messages never wrap the
/// bar's line: it cuts them to the terminal's width, and a retry's error goes on a line of its
/// own above the bar, once for as long as it stays the same.
struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    mode: Mode,
    last_error: Option<String>,
}

/// What the bar's line shows besides the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The rate and the time left.
    Moving,
    /// No progress, so no time left to estimate: when the next try is.
    Retrying,
    /// Which host the client waits for, and when it falls back.
    Waiting,
}

impl ProgressView {
    const MOVING: &str = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}";
    // Short, so that "waiting for host HOST (retry N, falls back in T s)" fits in 80 columns.
    const STALLED: &str = "{bar:10} {percent:>3}% {wide_msg}";

    /// `bar`: the upload's size on a terminal; None writes plain lines instead.
    fn new(bar: Option<u64>) -> Self {
        let view = ProgressView {
            bar: bar.map(indicatif::ProgressBar::new),
            mode: Mode::Moving,
            last_error: None,
        };
        view.style(Self::MOVING);
        view
    }

    fn style(&self, template: &str) {
        if let Some(pb) = &self.bar {
            pb.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        }
    }

    fn enter(&mut self, mode: Mode, message: String) {
        if mode != self.mode {
            let stalled = mode != Mode::Moving;
            if stalled != (self.mode != Mode::Moving) {
                self.style(if stalled { Self::STALLED } else { Self::MOVING });
            }
            self.mode = mode;
        }
        if let Some(pb) = &self.bar {
            pb.set_message(message);
        }
    }

    /// A line above the bar, or on its own without one.
    fn line(&self, text: &str) {
        match &self.bar {
            Some(pb) => pb.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn show(&mut self, e: &crate::client::Event) {
        use crate::client::Event;
        let text = e.describe().unwrap_or_default();
        match e {
            Event::Progress { offset, .. } => {
                if let Some(pb) = &self.bar {
                    pb.set_position(*offset);
                }
                self.last_error = None;
                if self.mode != Mode::Moving {
                    self.enter(Mode::Moving, String::new());
                }
            }
            Event::Waiting { .. } => {
                if self.bar.is_none() {
                    self.line(&text);
                }
                self.enter(Mode::Waiting, text);
            }
            Event::Retry { error, delay_s } => {
                if self.last_error.as_ref() != Some(error) {
                    self.line(&text);
                    self.last_error = Some(error.clone());
                }
                // A waiting message already says that the client tries again.
                if self.mode != Mode::Waiting {
                    self.enter(Mode::Retrying, format!("retrying in {delay_s} s"));
                }
            }
            Event::Restart { .. } | Event::Fallback { .. } => {
                self.line(&text);
                self.enter(Mode::Moving, String::new());
            }
            Event::Session { .. } | Event::Reply { .. } => {}
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

/// `bitsfarm farm` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FarmArgs {
    /// An UploadFarm manifest to run: its directories, backends, limits and timeouts [default: a
    /// farm of 3 members with one upload directory at /].
    #[arg(long, short = 'f', value_name = "FARM.yaml")]
    pub file: Option<std::path::PathBuf>,
    /// Number of members [default: the file's replicas, else 3].
    #[arg(long)]
    pub replicas: Option<usize>,
    /// The shared address; members listen on the next ports up (then the receiver).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR", value_parser = crate::config::parse_listen_addr)]
    pub shared: std::net::SocketAddr,
    /// Folder with one folder per member.
    #[arg(long, default_value = "./bitsfarm-farm", value_name = "DIR")]
    pub data_dir: std::path::PathBuf,
    /// Seconds a client keeps to a member after an error before it falls back to the shared address
    /// [default: the file's, else 30].
    #[arg(long, value_name = "SECS")]
    pub host_id_fallback_timeout: Option<u64>,
    /// Give members no host id: every packet goes through the shared address (IIS farms without
    /// BITSHostId behave like this).
    #[arg(long)]
    pub no_host_id: bool,
    /// Turn off session handoff: a packet that reaches a member other than the one holding its
    /// session gets "session not found" and the client restarts from zero, as with IIS.
    #[arg(long)]
    pub no_handoff: bool,
    /// Run the reference receiver and deliver every upload to it by value.
    #[arg(long)]
    pub receiver: bool,
    /// Seconds without progress before a session expires.
    #[arg(long, value_name = "SECS")]
    pub session_timeout: Option<u64>,
}

/// `bitsfarm farm`: runs the members and, when asked, the receiver, until Ctrl-C.
/// Members and receivers log in `log_format`, as the farm does.
pub async fn farm(args: FarmArgs, log_format: crate::telemetry::LogFormat) -> anyhow::Result<()> {
    // The same UploadFarmSpec -> server configuration mapping the operator uses.
    let (mut server, spec_replicas, file_fallback) = match &args.file {
        Some(path) => {
            let farm = crate::api::manifest::load_farm(path)?;
            let config = crate::api::server_config(&farm.spec)?;
            let replicas = usize::try_from(farm.spec.replicas).unwrap_or(0);
            (config, replicas, crate::farm::names_fallback(path))
        }
        None => (crate::config::ConfigFile::default(), 3, false),
    };
    let fallback_default =
        crate::farm::settle_fallback(&mut server, args.host_id_fallback_timeout, file_fallback);
    if args.session_timeout.is_some() {
        server.session_timeout = args.session_timeout;
    }
    let plan = crate::farm::FarmPlan {
        replicas: args.replicas.unwrap_or(spec_replicas),
        shared: args.shared,
        data_dir: args.data_dir,
        host_ids: !args.no_host_id,
        handoff: !args.no_handoff,
        server,
        receiver: args.receiver,
        fallback_default,
        json_logs: log_format == crate::telemetry::LogFormat::Json,
    };
    let exe = std::env::current_exe().context("finding the bitsfarm executable")?;
    crate::farm::run(plan, &exe).await?;
    Ok(())
}
