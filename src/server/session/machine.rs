//! The protocol's rules for one session, pure: a packet against the session's record decides what
//! happens, and `UploadDir` carries it out (records, writes, delivers, answers). No I/O, no locks
//! and no clock here: all a rule needs comes in as arguments, so every rule is tested below.

use super::record::{REPLIES_DIR, REPLY_FILE, SessionRecord, SessionState};
use crate::bits::paths::{SESSION_DIR, UploadPrefix};
use crate::bits::protocol::{Ack, BitsError, FragmentRange, SessionId, header};
use crate::config::NotifyType;
use crate::server::limits::Limit;
use crate::server::notify::DeliveryOutcome;

/// A Fragment refused before anything about it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: BitsError,
    /// The configured limit that refused it, for the metrics.
    pub limit: Option<Limit>,
}

impl From<BitsError> for Refusal {
    fn from(error: BitsError) -> Self {
        Refusal { error, limit: None }
    }
}

/// What a Fragment the session accepts does, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentPlan {
    /// The upload's size, first named by this fragment: recorded before anything is written, so
    /// later fragments must agree. Only a fragment the session takes names it: one refused with
    /// 416 may be a stray (another job's), and fixing its total would turn the client's real first
    /// fragment into a fatal 400.
    pub record_total: Option<u64>,
    /// The bytes to write, or the 416 that tells the client where to resume.
    pub write: Result<Write, BitsError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Drop the first `skip` bytes of the body (they are held already) and append the next `len`
    /// at the session's offset.
    Append { skip: u64, len: u64 },
    /// Every byte is held already (a retransmit after a lost Ack): nothing is written, and the Ack
    /// names the current offset.
    Held,
}

/// Checks a Fragment for `range` against a session whose file holds `offset` bytes, in the order
/// the answers take precedence: no longer receiving, over the directory's upload size, a total
/// that differs from the first fragment's, then a start past the next expected byte (416).
///
/// `data_file_exists` only matters to the empty upload (`bytes */0`): its fragment carries no
/// byte but must still create the empty file that Close commits, once.
pub fn fragment(
    record: &SessionRecord,
    offset: u64,
    range: FragmentRange,
    max_upload_size: Option<u64>,
    data_file_exists: bool,
) -> Result<FragmentPlan, Refusal> {
    if record.state != SessionState::Receiving {
        return Err(BitsError::session_not_found().into());
    }
    if let Some(max) = max_upload_size
        && range.total > max
    {
        return Err(Refusal {
            error: BitsError::too_large(format!(
                "the upload is {} bytes; this directory accepts at most {max}",
                range.total
            )),
            limit: Some(Limit::UploadSize),
        });
    }
    let record_total = match record.total {
        Some(total) if total != range.total => {
            return Err(BitsError::invalid(format!(
                "Content-Range total {} differs from the {total} given by earlier fragments",
                range.total
            ))
            .into());
        }
        Some(_) => None,
        None => Some(range.total),
    };
    let write = place(offset, range, data_file_exists);
    Ok(FragmentPlan {
        record_total: record_total.filter(|_| write.is_ok()),
        write,
    })
}

/// Where a fragment's bytes go, given the next expected offset `next`.
fn place(next: u64, range: FragmentRange, data_file_exists: bool) -> Result<Write, BitsError> {
    if range.start > next {
        return Err(BitsError::out_of_sync(next));
    }
    if range.end > next || (range.is_empty() && !data_file_exists) {
        let skip = next - range.start;
        Ok(Write::Append {
            skip,
            len: range.len() - skip,
        })
    } else {
        Ok(Write::Held)
    }
}

/// The Ack of a stored (or already held) Fragment: the next offset the server expects and, once
/// the upload was delivered to a server application, where its reply is.
pub fn fragment_ack(offset: u64, reply_url: Option<String>) -> Ack {
    let ack = Ack::ok().with(header::RECEIVED_CONTENT_RANGE, offset.to_string());
    match reply_url {
        Some(url) => ack.with(header::REPLY_URL, url),
        None => ack,
    }
}

/// What a Close-Session or Cancel-Session does to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The session already ended (a retried packet): answered 200, nothing else happens.
    Repeat,
    /// The upload is complete: delivered if it was not yet, committed, and the session closed.
    Commit,
    /// The session ends and its bytes are dropped: a Close before the upload was complete, or a
    /// Cancel.
    Discard,
}

/// Close-Session on a session in `state` whose upload is `complete` (or not).
pub fn close(state: SessionState, complete: bool) -> Result<Ending, BitsError> {
    match state {
        SessionState::Closed => Ok(Ending::Repeat),
        SessionState::Cancelled => Err(BitsError::not_found(
            "the session was cancelled; its upload no longer exists",
        )),
        SessionState::Receiving if complete => Ok(Ending::Commit),
        SessionState::Receiving => Ok(Ending::Discard),
    }
}

/// Cancel-Session on a session in `state`.
pub fn cancel(state: SessionState) -> Ending {
    match state {
        SessionState::Receiving => Ending::Discard,
        SessionState::Cancelled => Ending::Repeat,
        // The file is already committed; cancelling cannot take it back (as with IIS).
        SessionState::Closed => Ending::Repeat,
    }
}

/// Whether a committed upload is put at its destination: always without a server application,
/// and with one only when its answer asked for it (BITS-Copy-File-To-Destination).
pub fn commits_to_destination(kind: NotifyType, delivery: Option<&DeliveryOutcome>) -> bool {
    kind == NotifyType::None || delivery.is_some_and(|d| d.copy_to_destination)
}

/// The URL a client downloads the reply from: the backend's static URL, or this server's copy
/// under the upload directory (an absolute path, so it resolves against the host the client used).
pub fn reply_url(
    upload_path: &UploadPrefix,
    id: &SessionId,
    delivery: Option<&DeliveryOutcome>,
) -> String {
    if let Some(u) = delivery.and_then(|d| d.static_reply_url.clone()) {
        return u;
    }
    let prefix = upload_path.as_str().trim_end_matches('/');
    let id = id.as_str().replace('{', "%7B").replace('}', "%7D");
    format!("{prefix}/{SESSION_DIR}/{REPLIES_DIR}/{id}/{REPLY_FILE}")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::bits::protocol::hresult;

    const ID: &str = "{12345678-9ABC-DEF0-1234-56789ABCDEF0}";

    fn record(state: SessionState, total: Option<u64>) -> SessionRecord {
        SessionRecord {
            id: SessionId::parse(ID).unwrap(),
            url_path: "/up/a.bin".into(),
            destination: PathBuf::from("a.bin"),
            content_name: None,
            created_unix: 0,
            total,
            state,
            owner: None,
        }
    }

    fn receiving(total: Option<u64>) -> SessionRecord {
        record(SessionState::Receiving, total)
    }

    /// `Content-Range: bytes first-last/total`, as the client sends it.
    fn range(header: &str) -> FragmentRange {
        FragmentRange::parse(header).unwrap()
    }

    /// The plan for a fragment to a receiving session holding `offset` bytes of `total`.
    fn plan(total: Option<u64>, offset: u64, header: &str) -> FragmentPlan {
        fragment(&receiving(total), offset, range(header), None, true).unwrap()
    }

    fn write(total: u64, offset: u64, header: &str) -> Write {
        let p = plan(Some(total), offset, header);
        assert_eq!(p.record_total, None, "the total is recorded once: {p:?}");
        p.write.unwrap()
    }

    fn refused(
        record: &SessionRecord,
        offset: u64,
        header: &str,
        max_upload_size: Option<u64>,
    ) -> Refusal {
        fragment(record, offset, range(header), max_upload_size, true).unwrap_err()
    }

    fn append(skip: u64, len: u64) -> Write {
        Write::Append { skip, len }
    }

    #[test]
    fn the_first_fragment_records_the_total_and_is_written_whole() {
        let p = plan(None, 0, "bytes 0-99/1000");
        assert_eq!(p.record_total, Some(1000));
        assert_eq!(p.write, Ok(append(0, 100)));
        // A whole file in one fragment.
        let p = plan(None, 0, "bytes 0-4891/4892");
        assert_eq!((p.record_total, p.write), (Some(4892), Ok(append(0, 4892))));
    }

    #[test]
    fn fragments_in_order_are_appended_whole() {
        assert_eq!(write(1000, 100, "bytes 100-199/1000"), append(0, 100));
        assert_eq!(write(1000, 999, "bytes 999-999/1000"), append(0, 1));
    }

    #[test]
    fn an_overlapping_fragment_writes_only_its_new_tail() {
        assert_eq!(write(200, 100, "bytes 50-149/200"), append(50, 50));
        assert_eq!(write(200, 100, "bytes 0-199/200"), append(100, 100));
        assert_eq!(write(200, 100, "bytes 99-100/200"), append(1, 1));
    }

    #[test]
    fn a_retransmitted_fragment_is_held_and_acked_with_the_current_offset() {
        for header in [
            "bytes 100-199/300",
            "bytes 0-99/300",
            "bytes 0-199/300",
            "bytes 150-199/300",
            "bytes 199-199/300",
        ] {
            assert_eq!(write(300, 200, header), Write::Held, "{header}");
        }
        // The final fragment again, after the upload is complete (its Ack was lost).
        assert_eq!(write(300, 300, "bytes 200-299/300"), Write::Held);
        assert_eq!(
            fragment_ack(200, None).header(header::RECEIVED_CONTENT_RANGE),
            Some("200")
        );
    }

    #[test]
    fn a_fragment_after_a_gap_is_416_with_the_next_offset() {
        for (offset, header) in [(0, "bytes 10-19/100"), (30, "bytes 31-39/100")] {
            let e = plan(Some(100), offset, header).write.unwrap_err();
            assert_eq!(e, BitsError::out_of_sync(offset), "{header}");
            assert_eq!((e.status, e.received_content_range), (416, Some(offset)));
            let ack = Ack::from(e);
            assert_eq!(
                ack.header(header::RECEIVED_CONTENT_RANGE),
                Some(offset.to_string().as_str())
            );
        }
    }

    #[test]
    fn an_out_of_sync_first_fragment_records_no_total() {
        // A stray fragment (another job's, or one sent after the session was recreated) is
        // answered 416 and leaves the size open: the client's real first fragment, whatever total
        // it names, is then accepted instead of a fatal 400.
        let p = plan(None, 0, "bytes 10-19/100");
        assert_eq!(p.record_total, None);
        assert_eq!(p.write, Err(BitsError::out_of_sync(0)));
        let p = plan(None, 0, "bytes 0-9/10");
        assert_eq!((p.record_total, p.write), (Some(10), Ok(append(0, 10))));
        // Once a total is recorded, an out-of-sync fragment naming another one is still a 400.
        let r = refused(&receiving(Some(10)), 0, "bytes 5-9/100", None);
        assert_eq!(r.error.status, 400);
    }

    #[test]
    fn a_changed_total_is_400_whichever_way_it_changed() {
        for header in ["bytes 50-99/101", "bytes 50-59/60"] {
            let r = refused(&receiving(Some(100)), 50, header, None);
            assert_eq!((r.error.status, r.error.code), (400, hresult::E_INVALIDARG));
            assert_eq!(r.limit, None);
            assert!(r.error.message.contains("differs from the 100"), "{r:?}");
        }
        // It takes precedence over the offset: nothing about such a fragment is trusted.
        let r = refused(&receiving(Some(100)), 0, "bytes 50-59/60", None);
        assert_eq!(r.error.status, 400);
    }

    #[test]
    fn a_total_over_the_upload_size_limit_is_500_too_large() {
        let r = refused(&receiving(None), 0, "bytes 0-9/1001", Some(1000));
        assert_eq!(
            (r.error.status, r.error.code, r.limit),
            (500, hresult::BG_E_TOO_LARGE, Some(Limit::UploadSize))
        );
        assert!(r.error.message.contains("1001") && r.error.message.contains("1000"));
        // Exactly the limit is accepted.
        let p = fragment(
            &receiving(None),
            0,
            range("bytes 0-399/1000"),
            Some(1000),
            false,
        );
        assert_eq!(p.unwrap().write, Ok(append(0, 400)));
        // The limit comes before the total check.
        let r = refused(&receiving(Some(100)), 0, "bytes 0-9/2000", Some(1000));
        assert_eq!(r.limit, Some(Limit::UploadSize));
    }

    #[test]
    fn an_ended_session_takes_no_fragment() {
        for state in [SessionState::Closed, SessionState::Cancelled] {
            let r = refused(&record(state, Some(100)), 0, "bytes 0-9/100", None);
            assert_eq!(
                r,
                Refusal::from(BitsError::session_not_found()),
                "{state:?}"
            );
            // Even one the upload size limit would refuse: the session is gone first.
            let r = refused(&record(state, None), 0, "bytes 0-9/2000", Some(1000));
            assert_eq!(
                (r.error.code, r.limit),
                (hresult::BG_E_SESSION_NOT_FOUND, None)
            );
        }
    }

    #[test]
    fn the_empty_upload_creates_its_file_once() {
        let empty = range("bytes */0");
        let first = fragment(&receiving(None), 0, empty, None, false).unwrap();
        assert_eq!(first.record_total, Some(0));
        assert_eq!(first.write, Ok(append(0, 0)));
        // Retransmitted: the file is there, nothing to do.
        let again = fragment(&receiving(Some(0)), 0, empty, None, true).unwrap();
        assert_eq!((again.record_total, again.write), (None, Ok(Write::Held)));
        // The file is missing (a crash before it was made): made now.
        let lost = fragment(&receiving(Some(0)), 0, empty, None, false).unwrap();
        assert_eq!(lost.write, Ok(append(0, 0)));
    }

    #[test]
    fn only_the_empty_upload_looks_at_the_data_file() {
        for exists in [false, true] {
            let at_200 = |header| {
                let p = fragment(&receiving(Some(300)), 200, range(header), None, exists);
                p.unwrap().write
            };
            assert_eq!(at_200("bytes 0-99/300"), Ok(Write::Held), "{exists}");
            assert_eq!(at_200("bytes 200-299/300"), Ok(append(0, 100)), "{exists}");
            let gap = at_200("bytes 250-299/300");
            assert_eq!(gap, Err(BitsError::out_of_sync(200)), "{exists}");
        }
    }

    #[test]
    fn the_fragment_ack_names_the_next_offset_and_the_reply_url_once_delivered() {
        let ack = fragment_ack(4892, None);
        assert_eq!(ack.status, 200);
        assert_eq!(ack.header(header::RECEIVED_CONTENT_RANGE), Some("4892"));
        assert_eq!(ack.header(header::REPLY_URL), None);
        let ack = fragment_ack(10, Some("/r".into()));
        assert_eq!(ack.header(header::RECEIVED_CONTENT_RANGE), Some("10"));
        assert_eq!(ack.header(header::REPLY_URL), Some("/r"));
    }

    #[test]
    fn close_commits_a_complete_upload_and_discards_an_incomplete_one() {
        assert_eq!(close(SessionState::Receiving, true), Ok(Ending::Commit));
        assert_eq!(close(SessionState::Receiving, false), Ok(Ending::Discard));
    }

    #[test]
    fn a_retried_close_is_200_but_close_after_cancel_is_404() {
        for complete in [false, true] {
            assert_eq!(close(SessionState::Closed, complete), Ok(Ending::Repeat));
            let e = close(SessionState::Cancelled, complete).unwrap_err();
            assert_eq!((e.status, e.code), (404, hresult::BG_E_HTTP_ERROR_404));
        }
    }

    #[test]
    fn cancel_discards_a_receiving_session_and_is_200_once_ended() {
        assert_eq!(cancel(SessionState::Receiving), Ending::Discard);
        assert_eq!(cancel(SessionState::Cancelled), Ending::Repeat);
        // After Close the file is committed: Cancel cannot take it back.
        assert_eq!(cancel(SessionState::Closed), Ending::Repeat);
    }

    fn delivered(copy_to_destination: bool, static_reply_url: Option<&str>) -> DeliveryOutcome {
        DeliveryOutcome {
            idempotency_key: "bf1-0".into(),
            sha256: String::new(),
            delivered_unix: 0,
            static_reply_url: static_reply_url.map(str::to_string),
            copy_to_destination,
            suppressed_duplicate: false,
        }
    }

    #[test]
    fn without_a_backend_every_committed_upload_goes_to_its_destination() {
        assert!(commits_to_destination(NotifyType::None, None));
        assert!(commits_to_destination(
            NotifyType::None,
            Some(&delivered(false, None))
        ));
    }

    #[test]
    fn with_a_backend_only_a_copy_request_puts_the_file_in_place() {
        for kind in [NotifyType::ByValue, NotifyType::ByReference] {
            assert!(!commits_to_destination(kind, None));
            assert!(!commits_to_destination(kind, Some(&delivered(false, None))));
            assert!(commits_to_destination(kind, Some(&delivered(true, None))));
        }
    }

    #[test]
    fn the_reply_url_lives_under_the_upload_path_with_the_braces_escaped() {
        let id = SessionId::parse(ID).unwrap();
        let stored = delivered(false, None);
        let root = UploadPrefix::parse("/").unwrap();
        assert_eq!(
            reply_url(&root, &id, Some(&stored)),
            "/BITS-Sessions/Replies/%7B12345678-9ABC-DEF0-1234-56789ABCDEF0%7D/responsefile.bin"
        );
        let vdir = UploadPrefix::parse("/vdir/").unwrap();
        assert!(reply_url(&vdir, &id, None).starts_with("/vdir/BITS-Sessions/Replies/%7B12345678"));
    }

    #[test]
    fn a_static_reply_url_is_passed_through() {
        let id = SessionId::parse(ID).unwrap();
        let root = UploadPrefix::parse("/").unwrap();
        let d = delivered(false, Some("https://cdn.example/r/1"));
        assert_eq!(reply_url(&root, &id, Some(&d)), "https://cdn.example/r/1");
    }
}
