//! GET and HEAD: a session's reply (Upload-Reply), and completed files where a directory allows
//! downloads, with Range.
//!
//! The file is opened below the data folder without following any symbolic link (a link planted
//! there answers 404, never the file it points to), and only then handed to tower-http, which
//! does the HTTP side (Range, HEAD, conditional requests), through `/proc/self/fd/N`: that name
//! refers to the descriptor we opened, so tower-http serves exactly that file, whatever happens to
//! the path meanwhile.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::ServiceExt;

use super::response::{Body, not_allowed, text};
use crate::bits::paths::{SESSION_DIR, destination_path};
use crate::bits::protocol::SessionId;
use crate::server::session::{REPLIES_DIR, REPLY_FILE};
use crate::server::state::AppState;

const NO_REPLY: &str =
    "no reply here: the session is closed, cancelled, expired or has no reply yet\n";

pub async fn download(
    state: &AppState,
    req: Request<Incoming>,
    user: Option<&str>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((dir, below)) = state.directory_for(&path) else {
        // The upload paths only (never the data folders): what a client needs to aim right.
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "not found: this server takes uploads below {}\n",
                state.upload_paths()
            ),
        );
    };
    if let Some(id) = reply_session(below) {
        if dir.check_owner(&id, user).await.is_err() {
            return text(StatusCode::NOT_FOUND, NO_REPLY);
        }
        return match dir.reply_file(&id).await {
            Some(file) => serve_file(file, req).await,
            None => text(StatusCode::NOT_FOUND, NO_REPLY),
        };
    }
    if !dir.config.allow_downloads {
        return not_allowed("downloads are off for this upload directory\n");
    }
    let Ok(rel) = destination_path(below) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    match dir.download_file(rel).await {
        Some(file) => serve_file(file, req).await,
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The session named by a reply URL below an upload prefix:
/// `BITS-Sessions/Replies/{SESSION-ID}/responsefile.bin` (braces may be percent-encoded).
pub fn reply_session(below: &str) -> Option<SessionId> {
    let mut parts = below.split('/');
    let (a, b, id, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !a.eq_ignore_ascii_case(SESSION_DIR)
        || !b.eq_ignore_ascii_case(REPLIES_DIR)
        || file != REPLY_FILE
    {
        return None;
    }
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .ok()?;
    SessionId::parse(&id)
}

/// Serves `file`, a regular file already opened, with Range and HEAD.
pub async fn serve_file(file: File, req: Request<Incoming>) -> Response<Body> {
    let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    // tower-http opens the name before it answers; `file` stays open until then.
    let served = tower_http::services::ServeFile::new(by_fd)
        .oneshot(req)
        .await;
    drop(file);
    match served {
        Ok(r) if r.status() == StatusCode::NOT_FOUND => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the file cannot be served: /proc is not mounted\n",
        ),
        Ok(r) => r.map(|b| b.map_err(io::Error::other).boxed_unsync()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "{0F0E0D0C-0B0A-4908-8706-050403020100}";

    #[test]
    fn a_reply_url_names_its_session() {
        let at = |below: String| reply_session(&below).map(|id| id.as_str().to_string());
        assert_eq!(
            at(format!("BITS-Sessions/Replies/{ID}/responsefile.bin")),
            Some(ID.into())
        );
        assert_eq!(
            at(format!(
                "bits-sessions/replies/%7B{}%7D/responsefile.bin",
                &ID[1..37].to_ascii_lowercase()
            )),
            Some(ID.into()),
            "any case, braces percent-encoded"
        );
        for not_a_reply in [
            format!("BITS-Sessions/Replies/{ID}/other.bin"),
            format!("BITS-Sessions/Replies/{ID}/responsefile.bin/x"),
            format!("BITS-Sessions/Requests/{ID}/responsefile.bin"),
            "BITS-Sessions/Replies/../responsefile.bin".to_string(),
            "a.bin".to_string(),
        ] {
            assert_eq!(at(not_a_reply.clone()), None, "{not_a_reply}");
        }
    }
}
