//! `bitsfarm receiver`: the reference server application. It stores each delivered upload exactly
//! once per `Idempotency-Key` and answers a repeat with the reply it gave the first time. It is the
//! example to copy when writing a backend for bitsfarm, and the backend of the tests and local farm.
//!
//! Each delivery is stored at its upload's own path and name below `--dir` (the path of
//! `BITS-Original-Request-URL`: an upload to `/dumps/app.dmp` lands at `<dir>/dumps/app.dmp`),
//! and its record, by key, in `<dir>/.bitsfarm/deliveries/<key>.json` (see `store`: how a path is
//! made safe, and what happens when two uploads share a URL). Its log line and its reply name
//! where the file went.
//!
//! By value the file is the request's body. By reference (`BITS-Request-DataFile-Name`,
//! `BITS-Response-DataFile-Name`) the server names files in its own data folder; the receiver
//! uses them only beneath the folders it was told to trust (`--trust-dir`, none by default), and
//! follows no link there (see `trusted`). A real backend that takes deliveries by reference must
//! do the same: anyone who can reach it can send those headers.

mod store;
mod trusted;

pub use store::{STATE_DIR, StoreError};
pub use trusted::{TrustError, TrustedDirs};

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::bits::notification::{
    IDEMPOTENCY_KEY, ORIGINAL_REQUEST_URL, REPR_DIGEST, REQUEST_DATAFILE_NAME,
    RESPONSE_DATAFILE_NAME, repr_digest,
};

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot prepare the receiver folder {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// What the receiver keeps about one delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct StoredDelivery {
    pub idempotency_key: String,
    pub sha256: String,
    pub bytes: u64,
    #[serde(default)]
    pub original_url: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Where the file is, below the receiver's folder, with `/` between names. None in records
    /// of the layout before (`<key>/content`).
    #[serde(default)]
    pub stored_path: Option<String>,
    pub received_unix: u64,
    pub reply: String,
}

struct Receiver {
    folder: Arc<store::Folder>,
    /// Where files named by reference may be read and written.
    trusted: Arc<TrustedDirs>,
    /// Serialises the check-then-store step, so two copies arriving at once are stored once.
    commit: tokio::sync::Mutex<()>,
    registry: Registry,
    deliveries: Counter,
    duplicates: Counter,
    bytes: Counter,
}

pub struct ReceiverServer {
    listener: TcpListener,
    state: Arc<Receiver>,
}

impl ReceiverServer {
    /// Serves on `addr`, storing under `dir`, and taking deliveries by reference only for files
    /// beneath `trusted` (by value only when it is empty).
    pub async fn bind(
        addr: SocketAddr,
        dir: &Path,
        trusted: &[PathBuf],
    ) -> Result<Self, ReceiverError> {
        let trusted = Arc::new(TrustedDirs::open(trusted)?);
        let folder =
            Arc::new(
                store::Folder::open(dir).map_err(|source| ReceiverError::Prepare {
                    path: dir.to_path_buf(),
                    source,
                })?,
            );
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ReceiverError::Bind { addr, source })?;
        let mut registry = Registry::with_prefix("bitsfarm_receiver");
        let (deliveries, duplicates, bytes) =
            (Counter::default(), Counter::default(), Counter::default());
        registry.register(
            "deliveries",
            "Deliveries stored (first copies)",
            deliveries.clone(),
        );
        registry.register(
            "duplicates_suppressed",
            "Deliveries whose Idempotency-Key was already stored; answered with the first reply",
            duplicates.clone(),
        );
        registry.register("stored_bytes", "Bytes stored", bytes.clone());
        Ok(ReceiverServer {
            listener,
            state: Arc::new(Receiver {
                folder,
                trusted,
                commit: tokio::sync::Mutex::new(()),
                registry,
                deliveries,
                duplicates,
                bytes,
            }),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The trusted folders, canonical.
    pub fn trusted(&self) -> Vec<PathBuf> {
        self.state.trusted.paths().map(Path::to_path_buf).collect()
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let st = self.state.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handle(st.clone(), req));
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
                _ = &mut shutdown => break,
            }
        }
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A path header: absent, or text (a header that is present but not text is refused rather than
/// taken as absent, which would turn a by-reference delivery into an empty one by value).
fn path_header(h: &HeaderMap, name: &'static str) -> Result<Option<PathBuf>, Failure> {
    match h.get(name).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(PathBuf::from(v))),
        Some(Err(_)) => Err((
            StatusCode::BAD_REQUEST,
            format!("{name} is not text; name the file as a UTF-8 path"),
        )),
    }
}

async fn handle(
    st: Arc<Receiver>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::GET {
        return Ok(match req.uri().path() {
            "/healthz" => reply(StatusCode::OK, "ok\n"),
            "/metrics" => {
                let mut out = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut out, &st.registry);
                reply(StatusCode::OK, out)
            }
            _ => reply(StatusCode::NOT_FOUND, "not found\n"),
        });
    }
    if req.method() != Method::POST {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST deliveries here\n",
        ));
    }
    Ok(match receive(&st, req).await {
        Ok(r) => r,
        Err((status, message)) => {
            warn!(%status, message, "delivery refused");
            reply(status, format!("{message}\n"))
        }
    })
}

type Failure = (StatusCode, String);

fn internal(e: io::Error) -> Failure {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("storage error: {e}"),
    )
}

fn stored_failure(e: StoreError) -> Failure {
    (
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.to_string(),
    )
}

fn refused(e: trusted::Refused) -> Failure {
    (
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
        e.to_string(),
    )
}

/// Runs file-system lookups on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(internal(io::Error::other(e))))
}

async fn receive(st: &Receiver, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Failure> {
    let (parts, mut body) = req.into_parts();
    let h = &parts.headers;
    // Both names are checked before anything is read or stored, so a refused name changes
    // nothing anywhere.
    let reply_to = match path_header(h, RESPONSE_DATAFILE_NAME)? {
        Some(named) => {
            let trusted = st.trusted.clone();
            Some(
                blocking(move || {
                    trusted
                        .reply_target("BITS-Response-DataFile-Name", &named)
                        .map_err(refused)
                })
                .await?,
            )
        }
        None => None,
    };
    let by_reference = match path_header(h, REQUEST_DATAFILE_NAME)? {
        Some(named) => {
            let trusted = st.trusted.clone();
            let f = blocking(move || {
                trusted
                    .open_request_file("BITS-Request-DataFile-Name", &named)
                    .map_err(refused)
            })
            .await?;
            Some(tokio::fs::File::from_std(f))
        }
        None => None,
    };
    let folder = st.folder.clone();
    let (file, temp) = blocking(move || folder.incoming_file().map_err(internal)).await?;
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result: Result<(), Failure> = async {
        if let Some(mut f) = by_reference {
            // The server and this application share the volume: copy from the file it names.
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = f.read(&mut buf).await.map_err(internal)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(internal)?;
                size += n as u64;
            }
        } else {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(internal)?;
                    size += data.len() as u64;
                }
            }
        }
        file.sync_all().await.map_err(internal)
    }
    .await;
    drop(file);
    if let Err(e) = result {
        st.folder.discard(&temp);
        return Err(e);
    }
    let sha = hasher.finalize();
    let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(expected) = header(h, REPR_DIGEST)
        && expected.trim() != repr_digest(&sha)
    {
        st.folder.discard(&temp);
        return Err((
            StatusCode::BAD_REQUEST,
            format!("content does not match Repr-Digest {expected}"),
        ));
    }
    // Without a key (a server other than bitsfarm), the content hash is the best identity there is.
    let key = match header(h, IDEMPOTENCY_KEY).map(str::trim) {
        Some(k) if is_safe_key(k) => k.to_string(),
        Some(k) => {
            st.folder.discard(&temp);
            return Err((
                StatusCode::BAD_REQUEST,
                format!("Idempotency-Key {k:?} must be 1-128 letters, digits, '-' or '_'"),
            ));
        }
        None => format!("sha256-{sha_hex}"),
    };
    let original_url = header(h, ORIGINAL_REQUEST_URL).map(str::to_string);
    let rel = match store::destination(original_url.as_deref(), &key) {
        Ok(rel) => rel,
        Err(e) => {
            st.folder.discard(&temp);
            return Err(stored_failure(e));
        }
    };
    let _guard = st.commit.lock().await;
    let (folder, k) = (st.folder.clone(), key.clone());
    let stored = match blocking(move || folder.record(&k).map_err(internal)).await {
        Ok(found) => found,
        Err(e) => {
            st.folder.discard(&temp);
            return Err(e);
        }
    };
    let stored = if let Some(stored) = stored {
        st.folder.discard(&temp);
        st.duplicates.inc();
        // A record of the layout before names no path: its file is `<key>/content`.
        let at = (stored.stored_path.clone()).unwrap_or_else(|| format!("{key}/content"));
        info!(
            key,
            path = %st.folder.absolute(Path::new(&at)).display(),
            "duplicate delivery suppressed; answered with the first reply"
        );
        stored
    } else {
        let session_id = header(h, "bits-session-id").map(str::to_string);
        let folder = st.folder.clone();
        let k = key.clone();
        let stored = blocking(move || {
            let placed = folder.place(&temp, &rel, size, &sha_hex).map_err(|e| {
                folder.discard(&temp);
                stored_failure(e)
            })?;
            let shown = placed.to_string_lossy().into_owned();
            let stored = StoredDelivery {
                idempotency_key: k.clone(),
                reply: format!("stored {size} bytes as {shown}, sha256 {sha_hex}, key {k}\n"),
                sha256: sha_hex,
                bytes: size,
                original_url,
                session_id,
                stored_path: Some(shown),
                received_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            folder.write_record(&stored).map_err(internal)?;
            Ok(stored)
        })
        .await?;
        st.deliveries.inc();
        st.bytes.inc_by(size);
        let at = stored.stored_path.as_deref().unwrap_or_default();
        info!(
            key,
            bytes = size,
            "delivery stored at {}",
            st.folder.absolute(Path::new(at)).display()
        );
        stored
    };
    if let Some(target) = reply_to {
        let text = stored.reply.clone();
        blocking(move || target.write(text.as_bytes()).map_err(internal)).await?;
        return Ok(reply(StatusCode::OK, Bytes::new()));
    }
    Ok(reply(StatusCode::OK, stored.reply))
}

fn is_safe_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
