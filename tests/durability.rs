//! Sessions survive a SIGKILL of the server: a restarted server on the same data folder resumes
//! every upload from the bytes it had acknowledged.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

const FRAG: usize = 256 * 1024;
/// A little over 4 MiB, so the last fragment is a short one.
const SIZE: usize = 4 * 1024 * 1024 + 12_345;

/// Sends `data[from..to]` in fragments of `FRAG`, asserting every Ack; returns the last Ack offset.
fn send_range(s: &Server, id: &str, path: &str, data: &[u8], from: usize, to: usize) -> u64 {
    let mut at = from;
    let mut acked = from as u64;
    for _ in 0..(data.len() / FRAG + 2) {
        if at >= to {
            break;
        }
        let end = (at + FRAG).min(to);
        let r = s.fragment(id, path, at as u64, &data[at..end], data.len() as u64);
        assert_eq!(r.status, 200, "fragment {at}-{}: {r:?}", end - 1);
        acked = r.received().expect("the Ack gives the next offset");
        assert_eq!(acked, end as u64, "fragment {at}-{}: Ack offset", end - 1);
        at = end;
    }
    assert!(at >= to, "the fragment loop did not reach {to}");
    acked
}

/// Like a BITS client after a lost connection: sends from `offset` and follows whatever offset the
/// server's Acks (200 or 416) name until the upload is complete.
fn resume(s: &Server, id: &str, path: &str, data: &[u8], mut offset: u64) {
    let total = data.len() as u64;
    for _ in 0..(data.len() / FRAG + 10) {
        if offset == total {
            return;
        }
        let start = offset as usize;
        let end = (start + FRAG).min(data.len());
        let r = s.fragment(id, path, offset, &data[start..end], total);
        let next = r
            .received()
            .unwrap_or_else(|| panic!("Ack without BITS-Received-Content-Range: {r:?}"));
        match r.status {
            200 => assert_eq!(next, end as u64, "fragment {start}-{}: {r:?}", end - 1),
            416 => assert!(next > offset, "416 must name a later offset: {r:?}"),
            _ => panic!("fragment {start}-{}: {r:?}", end - 1),
        }
        assert!(next <= total, "offset {next} beyond the total {total}");
        offset = next;
    }
    assert_eq!(offset, total, "the resume loop did not finish the upload");
}

#[test]
fn upload_resumes_after_sigkill_between_fragments() {
    let mut s = Server::start(&[]);
    let data = random_bytes(SIZE, 0xB175);
    let path = "/dumps/big.bin";
    let id = s.create_session(path);
    let first_part = 6 * FRAG;
    let acked = send_range(&s, &id, path, &data, 0, first_part);
    assert_eq!(acked, first_part as u64);

    s.restart();
    assert_eq!(s.ping().status, 200, "the restarted server answers");

    // The next fragment from the last acknowledged offset is accepted as such.
    let next_end = first_part + FRAG;
    let r = s.fragment(&id, path, acked, &data[first_part..next_end], SIZE as u64);
    assert_eq!(r.status, 200, "first fragment after the restart: {r:?}");
    assert_eq!(
        r.received(),
        Some(next_end as u64),
        "Ack offset after the restart"
    );

    // A retransmit of the very first fragment changes nothing.
    let r = s.fragment(&id, path, 0, &data[..FRAG], SIZE as u64);
    assert_eq!(
        r.status, 200,
        "retransmit of fragment 0 after the restart: {r:?}"
    );
    assert_eq!(
        r.received(),
        Some(next_end as u64),
        "a retransmit does not move the offset"
    );
    let held = std::fs::metadata(s.session_dir(&id).join("requestfile.bin"))
        .expect("the session file")
        .len();
    assert_eq!(held, next_end as u64, "nothing was written twice");

    // A second crash in the middle, then the rest.
    let mid = next_end + 4 * FRAG;
    send_range(&s, &id, path, &data, next_end, mid);
    s.restart();
    send_range(&s, &id, path, &data, mid, SIZE);
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close-Session: {r:?}");
    assert_eq!(
        file_sha256(&s.data_dir.join("dumps/big.bin")),
        sha256_hex(&data),
        "the committed file equals the source"
    );
}

/// Sends the head and `sent` bytes of a `len`-byte fragment at `start`, waits for the server to
/// take them in, then SIGKILLs and restarts it.
fn kill_mid_fragment(
    s: &mut Server,
    id: &str,
    path: &str,
    data: &[u8],
    start: usize,
    len: usize,
    sent: usize,
) {
    let req = fragment_request(
        id,
        path,
        start as u64,
        &data[start..start + len],
        data.len() as u64,
    );
    let mut c = s.connect();
    c.write_partial(&req, sent)
        .expect("sending half a fragment");
    // Let the server read what was sent (and possibly write some of it) before it dies.
    thread::sleep(Duration::from_millis(500));
    s.kill();
    drop(c);
    s.restart();
}

fn check_resume_after_kill_mid_fragment(fragment_len: usize, seed: u64) {
    let mut s = Server::start(&[]);
    let data = random_bytes(SIZE, seed);
    let path = "/mid.bin";
    let id = s.create_session(path);
    let acked = send_range(&s, &id, path, &data, 0, 4 * FRAG) as usize;
    let half = fragment_len / 2;
    kill_mid_fragment(&mut s, &id, path, &data, acked, fragment_len, half);

    // The client sends the fragment after the interrupted one; the server must say where it is.
    let after = acked + fragment_len;
    let end = (after + FRAG).min(SIZE);
    let r = s.fragment(&id, path, after as u64, &data[after..end], SIZE as u64);
    assert_error(&r, 416, None, "fragment past the interrupted one");
    let at = r.received().expect("416 names the next expected offset");
    assert!(
        at >= acked as u64 && at <= (acked + half) as u64,
        "after the crash the server expects {at}; it had acknowledged {acked} and got {half} more bytes"
    );
    eprintln!("resume: acked {acked}, sent {half} more, server expects {at}");
    // A retransmit from 0 does not move it.
    let r = s.fragment(&id, path, 0, &data[..FRAG], SIZE as u64);
    assert_eq!(
        (r.status, r.received()),
        (200, Some(at)),
        "retransmit of fragment 0: {r:?}"
    );

    resume(&s, &id, path, &data, at);
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "Close-Session: {r:?}");
    assert_eq!(
        file_sha256(&s.data_dir.join("mid.bin")),
        sha256_hex(&data),
        "the committed file equals the source"
    );
}

#[test]
fn upload_resumes_after_sigkill_mid_fragment_body() {
    check_resume_after_kill_mid_fragment(FRAG, 0x5EED_0001);
}

/// Same, with a fragment large enough that part of it reaches the session file before the kill.
#[test]
fn upload_resumes_after_sigkill_mid_large_fragment_body() {
    check_resume_after_kill_mid_fragment(3 * 1024 * 1024, 0x5EED_0002);
}

#[test]
fn session_total_survives_restart() {
    let mut s = Server::start(&[]);
    let data = random_bytes(1000, 21);
    let id = s.create_session("/total.bin");
    assert_eq!(
        s.fragment(&id, "/total.bin", 0, &data[..400], 1000)
            .received(),
        Some(400)
    );
    s.restart();
    let r = s.fragment(&id, "/total.bin", 400, &data[400..], 1001);
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "a different total after the restart",
    );
    let r = s.fragment(&id, "/total.bin", 400, &data[400..], 1000);
    assert_eq!((r.status, r.received()), (200, Some(1000)), "{r:?}");
    assert_eq!(s.close(&id, "/total.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("total.bin")).unwrap(), data);
}

#[test]
fn created_but_empty_session_survives_restart() {
    let mut s = Server::start(&[]);
    let id = s.create_session("/fresh.bin");
    s.restart();
    let data = random_bytes(3000, 22);
    let r = s.fragment(&id, "/fresh.bin", 100, &data[100..200], 3000);
    assert_error(&r, 416, None, "gap in a recovered empty session");
    assert_eq!(r.received(), Some(0), "{r:?}");
    send_range(&s, &id, "/fresh.bin", &data, 0, 3000);
    assert_eq!(s.close(&id, "/fresh.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("fresh.bin")).unwrap(), data);
    // A session id from before the restart at another URL is still refused.
    let other = s.create_session("/other.bin");
    s.restart();
    let r = s.fragment(&other, "/fresh2.bin", 0, b"x", 1);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "recovered session at another URL",
    );
}

#[test]
fn closed_and_cancelled_sessions_stay_so_after_restart() {
    let mut s = Server::start(&[]);
    let closed = s.create_session("/c.bin");
    assert_eq!(
        s.fragment(&closed, "/c.bin", 0, b"done", 4).received(),
        Some(4)
    );
    assert_eq!(s.close(&closed, "/c.bin").status, 200);
    let cancelled = s.create_session("/x.bin");
    assert_eq!(
        s.fragment(&cancelled, "/x.bin", 0, b"gone", 8).received(),
        Some(4)
    );
    assert_eq!(s.cancel(&cancelled, "/x.bin").status, 200);
    let zero = s.create_session("/z.bin");
    assert_eq!(s.send(&empty_fragment_request(&zero, "/z.bin")).status, 200);
    s.restart();
    let r = s.close(&closed, "/c.bin");
    assert_eq!(r.status, 200, "retried Close after a restart: {r:?}");
    assert_eq!(std::fs::read(s.data_dir.join("c.bin")).unwrap(), b"done");
    let r = s.cancel(&cancelled, "/x.bin");
    assert_eq!(r.status, 200, "retried Cancel after a restart: {r:?}");
    let r = s.fragment(&cancelled, "/x.bin", 4, b"gone", 8);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "Fragment of a cancelled session after a restart",
    );
    assert!(!s.data_dir.join("x.bin").exists());
    // The zero-byte upload, complete before the crash, commits after it.
    assert_eq!(s.close(&zero, "/z.bin").status, 200);
    assert_eq!(std::fs::read(s.data_dir.join("z.bin")).unwrap(), b"");
}

/// A recovered `session.json` is trusted for the destination: one that points out of the data
/// folder (tampered, or planted through nested data folders) must not be committed there.
#[test]
fn recovered_session_cannot_commit_outside_the_data_folder() {
    let mut s = Server::start_nested(&["l1"], &[]);
    let id = "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}";
    let dir = s.session_dir(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("requestfile.bin"), b"owned").unwrap();
    let record = format!(
        "{{\"id\":\"{id}\",\"url-path\":\"/f.bin\",\"destination\":\"../escaped.bin\",\
         \"created-unix\":0,\"total\":5,\"state\":\"receiving\"}}"
    );
    std::fs::write(dir.join("session.json"), record).unwrap();
    s.restart();
    let r = s.close(id, "/f.bin");
    let escaped = s.root.path().join("l1/escaped.bin");
    assert!(
        !escaped.exists(),
        "Close-Session answered {} and wrote {} outside the data folder",
        r.status,
        escaped.display()
    );
}
