//! Where uploads land, through real HTTP against the real binary: symbolic links planted inside the
//! data folder are never followed (uploads, overwrites, downloads, replies, cleanup), destinations
//! that could never be committed are refused at Create-Session, a refused first fragment does not
//! fix the upload's size, and a failed Create-Session leaves no session folder behind.
//!
//! The threat is someone with a shell on the server who can plant links in the data folder; the
//! folder "outside" stands for /etc. Every test checks that nothing outside changed: no entry
//! added or removed, every file's content and modification time as before.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

/// What a folder holds, to compare before and after: every entry (recursively, links not
/// followed) with its kind, content and modification time.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot(Vec<(PathBuf, String, Vec<u8>, Option<SystemTime>)>);

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Vec::new();
    for rel in tree(dir, &[]) {
        let p = dir.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let (kind, content) = if m.file_type().is_symlink() {
            (
                "link".into(),
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else if m.is_dir() {
            ("dir".into(), Vec::new())
        } else {
            ("file".into(), fs::read(&p).unwrap())
        };
        out.push((rel, kind, content, m.modified().ok()));
    }
    Snapshot(out)
}

/// A folder outside the data folder holding `victim.txt`, whose modification time lies an hour in
/// the past (so that a rewrite with the same bytes would still show).
struct Outside {
    dir: tempfile::TempDir,
    before: Snapshot,
}

const VICTIM: &[u8] = b"precious bytes that live outside the data folder\n";

impl Outside {
    fn new() -> Outside {
        let dir = tempfile::Builder::new()
            .prefix("bitsfarm-outside-")
            .tempdir()
            .unwrap();
        let victim = dir.path().join("victim.txt");
        fs::write(&victim, VICTIM).unwrap();
        let f = fs::File::options().write(true).open(&victim).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        drop(f);
        let before = snapshot(dir.path());
        Outside { dir, before }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn victim(&self) -> PathBuf {
        self.path().join("victim.txt")
    }

    #[track_caller]
    fn assert_untouched(&self, what: &str) {
        assert_eq!(
            snapshot(self.path()),
            self.before,
            "{what}: the folder outside the data folder changed"
        );
    }
}

fn plant(link: &Path, target: &Path) {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    symlink(target, link).unwrap_or_else(|e| panic!("planting {}: {e}", link.display()));
}

/// Create-Session, one fragment and the session id, for an upload of `data` to `path`.
fn started(s: &Server, path: &str, data: &[u8]) -> String {
    let id = s.create_session(path);
    s.send_fragments(&id, path, data, 0, data.len().max(1));
    id
}

// ---------------------------------------------------------------------------------------------
// Symbolic links: uploads
// ---------------------------------------------------------------------------------------------

#[test]
fn an_upload_through_a_linked_folder_is_refused_and_writes_nothing_outside() {
    let out = Outside::new();
    let s = Server::start(&[]);
    plant(&s.data_dir.join("etc"), out.path());

    // Planted before Create-Session: refused at once, so the client does not upload in vain.
    for path in ["/etc/pwn.bin", "/etc/sub/pwn.bin", "/etc/victim.txt"] {
        let r = s.send(&create_request(path));
        assert_error(&r, 403, Some(E_ACCESSDENIED), &format!("Create at {path}"));
    }

    // Planted between Create-Session and Close-Session: the commit refuses.
    let data = random_bytes(5000, 1);
    for path in ["/later/pwn.bin", "/later2/sub/deeper/pwn.bin"] {
        let id = started(&s, path, &data);
        let first = path.split('/').nth(1).unwrap();
        plant(&s.data_dir.join(first), out.path());
        let r = s.close(&id, path);
        assert_error(&r, 403, Some(E_ACCESSDENIED), &format!("Close at {path}"));
        // A retried Close meets the same link: the same fatal answer, never a 5xx to retry.
        let r = s.close(&id, path);
        assert_error(
            &r,
            403,
            Some(E_ACCESSDENIED),
            &format!("Close again at {path}"),
        );
    }
    out.assert_untouched("uploads through a linked folder");
}

#[test]
fn overwrites_never_replace_a_file_outside() {
    let out = Outside::new();
    let s = Server::start(&["--allow-overwrites"]);
    plant(&s.data_dir.join("etc"), out.path());
    plant(&s.data_dir.join("link.bin"), &out.victim());
    let data = random_bytes(3000, 2);

    for path in ["/etc/victim.txt", "/link.bin"] {
        let r = s.send(&create_request(path));
        assert_error(&r, 403, Some(E_ACCESSDENIED), &format!("Create at {path}"));
    }
    // Links planted after Create-Session: a folder on the way, and the destination itself.
    let id = started(&s, "/late/victim.txt", &data);
    plant(&s.data_dir.join("late"), out.path());
    let r = s.close(&id, "/late/victim.txt");
    assert_error(
        &r,
        403,
        Some(E_ACCESSDENIED),
        "Close through a linked folder",
    );

    let id = started(&s, "/late-link.bin", &data);
    plant(&s.data_dir.join("late-link.bin"), &out.victim());
    let r = s.close(&id, "/late-link.bin");
    assert_error(&r, 403, Some(E_ACCESSDENIED), "Close onto a link");
    assert!(
        fs::symlink_metadata(s.data_dir.join("late-link.bin"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the planted link is left as it was"
    );
    out.assert_untouched("overwrites through links");

    // An ordinary overwrite still works.
    s.upload("/plain.bin", b"first", 5);
    s.upload("/plain.bin", b"second", 6);
    assert_eq!(fs::read(s.data_dir.join("plain.bin")).unwrap(), b"second");
}

#[test]
fn a_link_planted_in_a_session_folder_is_never_written_through() {
    let out = Outside::new();
    let s = Server::start(&[]);
    let data = random_bytes(4000, 3);
    let id = s.create_session("/s.bin");
    let r = s.fragment(&id, "/s.bin", 0, &data[..1000], data.len() as u64);
    assert_eq!(r.status, 200, "{r:?}");
    let file = s.session_dir(&id).join("requestfile.bin");
    fs::remove_file(&file).unwrap();
    plant(&file, &out.victim());
    plant(&s.session_dir(&id).join("hash.state"), &out.victim());
    let r = s.fragment(&id, "/s.bin", 1000, &data[1000..], data.len() as u64);
    assert_error(&r, 403, Some(E_ACCESSDENIED), "Fragment into a linked file");
    out.assert_untouched("a fragment");
    let r = s.cancel(&id, "/s.bin");
    assert_eq!(r.status, 200, "Cancel: {r:?}");
    out.assert_untouched("cancel");
}

// ---------------------------------------------------------------------------------------------
// Symbolic links: cleanup
// ---------------------------------------------------------------------------------------------

/// Replaces the session table's folder `BITS-Sessions/Requests` by a link to a copy of it outside,
/// as a shell user could; returns that copy.
fn swap_requests_for_a_link(s: &Server, out: &Outside) -> PathBuf {
    let requests = s.data_dir.join("BITS-Sessions").join("Requests");
    let copy = out.path().join("Requests");
    fs::create_dir(&copy).unwrap();
    for e in fs::read_dir(&requests).unwrap().flatten() {
        let to = copy.join(e.file_name());
        fs::create_dir(&to).unwrap();
        for f in fs::read_dir(e.path()).unwrap().flatten() {
            fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    fs::rename(&requests, requests.with_file_name("Requests.moved")).unwrap();
    plant(&requests, &copy);
    copy
}

#[test]
fn cancel_and_expiry_never_clean_up_through_a_link() {
    let mut out = Outside::new();
    let s = Server::start(&["--session-timeout", "2", "--cleanup-interval", "1"]);
    let data = random_bytes(2000, 4);
    let cancelled = started(&s, "/c.bin", &data[..1000]);
    let expiring = started(&s, "/e.bin", &data[..1000]);
    swap_requests_for_a_link(&s, &out);
    out.before = snapshot(out.path());

    let r = s.cancel(&cancelled, "/c.bin");
    assert!(
        r.status == 403 || r.status == 200,
        "Cancel through a linked session folder: {r:?}"
    );
    out.assert_untouched("cancel");
    // The sweep runs every second; the session expires after 2 s idle.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        wait_until(Duration::from_secs(10), || s
            .metric("bitsfarm_sessions_expired_total")
            >= 1.0),
        "the expired session was swept"
    );
    let _ = expiring;
    out.assert_untouched("expiry");
}

#[test]
fn a_server_whose_session_folder_is_a_link_refuses_to_start() {
    let out = Outside::new();
    let data = tempfile::tempdir().unwrap();
    plant(&data.path().join("BITS-Sessions"), out.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server started on a data folder whose BITS-Sessions is a link");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success());
    assert!(
        err.contains("symbolic link") && err.contains("BITS-Sessions"),
        "the error names the link: {err}"
    );
    out.assert_untouched("a refused start");
}

// ---------------------------------------------------------------------------------------------
// Symbolic links: downloads and replies
// ---------------------------------------------------------------------------------------------

#[test]
fn downloads_never_follow_a_link() {
    let out = Outside::new();
    let s = Server::start(&["--allow-downloads"]);
    plant(&s.data_dir.join("etc"), out.path());
    plant(&s.data_dir.join("link.bin"), &out.victim());
    plant(&s.data_dir.join("sub").join("deep.bin"), &out.victim());
    for path in ["/etc/victim.txt", "/link.bin", "/sub/deep.bin"] {
        for method in ["GET", "HEAD"] {
            let r = s.send(&Request::new(method, path));
            assert_eq!(r.status, 404, "{method} {path}: {r:?}");
            assert!(
                !String::from_utf8_lossy(&r.body).contains("precious"),
                "{method} {path} leaked the file outside: {r:?}"
            );
        }
        let r = s.send(&Request::new("GET", path).header("Range", "bytes=0-3"));
        assert_eq!(r.status, 404, "ranged GET {path}: {r:?}");
    }
    // Ordinary downloads still work, with ranges and HEAD.
    s.upload("/sub/real.bin", b"0123456789", 10);
    let r = s.get("/sub/real.bin");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"0123456789"[..]));
    let r = s.send(&Request::new("GET", "/sub/real.bin").header("Range", "bytes=2-4"));
    assert_eq!((r.status, r.body.as_slice()), (206, &b"234"[..]), "{r:?}");
    assert_eq!(r.header("Content-Range"), Some("bytes 2-4/10"));
    let r = s.send(&Request::new("HEAD", "/sub/real.bin"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Content-Length"), Some("10"));
    assert!(r.body.is_empty());
    // An uploaded page is served as bytes, never as a page of this server.
    s.upload("/page.html", b"<script>alert(1)</script>", 25);
    let r = s.get("/page.html");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    out.assert_untouched("downloads");
}

#[test]
fn a_reply_is_never_served_through_a_link() {
    let out = Outside::new();
    fs::write(out.path().join("responsefile.bin"), b"precious reply").unwrap();
    let mut out = out;
    out.before = snapshot(out.path());
    let backend = Backend::start(|_, _| Answer::ok(b"the real reply"));
    let url = backend.url("/in");
    let s = Server::start(&["--notify-type", "by-value", "--notify-url", &url]);
    let data = random_bytes(100, 5);
    let id = s.create_session("/r.bin");
    let r = s.fragment(&id, "/r.bin", 0, &data, data.len() as u64);
    assert_eq!(r.status, 200, "{r:?}");
    let reply_url = r.header("BITS-Reply-URL").expect("a reply URL").to_string();
    let r = s.get(&reply_url);
    assert_eq!((r.status, r.text().as_str()), (200, "the real reply"));

    let replies = s.data_dir.join("BITS-Sessions").join("Replies");
    let reply_dir = replies.join(&id);
    fs::remove_dir_all(&reply_dir).unwrap();
    plant(&reply_dir, out.path());
    for method in ["GET", "HEAD"] {
        let r = s.send(&Request::new(method, &reply_url));
        assert_eq!(r.status, 404, "{method} of a reply through a link: {r:?}");
        assert!(!r.text().contains("precious"), "{r:?}");
    }
    // Close cleans the reply up: the link goes, what it points at stays.
    let r = s.close(&id, "/r.bin");
    assert_eq!(r.status, 200, "{r:?}");
    out.assert_untouched("a reply");
}

// ---------------------------------------------------------------------------------------------
// Destinations that can never be committed
// ---------------------------------------------------------------------------------------------

/// A URL path below `/` of `len` bytes, in segments of at most 255 bytes, ending in `.bin`.
fn long_url(len: usize) -> String {
    let mut segs = Vec::new();
    // Bytes after the leading slash; each further segment costs its length plus a slash.
    let mut left = len - 1;
    while left > 255 {
        segs.push("a".repeat(200));
        left -= 201;
    }
    segs.push(format!("{}.bin", "b".repeat(left - 4)));
    let url = format!("/{}", segs.join("/"));
    assert_eq!(url.len(), len);
    url
}

#[test]
fn a_destination_past_the_systems_path_limit_is_refused_at_create() {
    let s = Server::start(&[]);
    let root = fs::canonicalize(&s.data_dir).unwrap();
    let root_len = root.as_os_str().len();
    // The full path, root + URL path, may hold 4095 bytes (PATH_MAX with its NUL).
    let fits = long_url(4095 - root_len);
    let over = long_url(4096 - root_len);

    let r = s.send(&create_request(&over));
    assert_error(&r, 400, Some(E_INVALIDARG), "Create past PATH_MAX");
    assert!(
        r.header("BITS-Error-Code").is_some(),
        "a 4xx: fatal for the client, never retried for 14 days"
    );

    let data = b"just fits";
    s.upload(&fits, data, data.len());
    let committed = PathBuf::from(format!("{}{fits}", root.display()));
    assert_eq!(committed.as_os_str().len(), 4095);
    assert_eq!(fs::read(&committed).unwrap(), data);

    // One name over NAME_MAX (255 bytes).
    let r = s.send(&create_request(&format!("/{}.bin", "n".repeat(252))));
    assert_error(&r, 400, Some(E_INVALIDARG), "Create with a 256-byte name");
}

#[test]
fn a_destination_under_an_existing_file_is_refused_at_create() {
    let s = Server::start(&[]);
    s.upload("/file.bin", b"x", 1);
    for path in ["/file.bin/inner.bin", "/file.bin/a/b.bin"] {
        let r = s.send(&create_request(path));
        assert_error(&r, 400, Some(E_INVALIDARG), &format!("Create at {path}"));
    }
    assert_eq!(fs::read(s.data_dir.join("file.bin")).unwrap(), b"x");
}

#[test]
fn a_file_that_appears_on_the_path_before_close_is_a_fatal_4xx_at_close() {
    let s = Server::start(&[]);
    let data = random_bytes(500, 6);
    let id = started(&s, "/later/inner.bin", &data);
    fs::write(s.data_dir.join("later"), b"a file now").unwrap();
    for attempt in ["Close", "retried Close"] {
        let r = s.close(&id, "/later/inner.bin");
        assert_error(&r, 400, Some(E_INVALIDARG), attempt);
    }
    assert_eq!(fs::read(s.data_dir.join("later")).unwrap(), b"a file now");
}

// ---------------------------------------------------------------------------------------------
// A refused first fragment; a failed Create-Session
// ---------------------------------------------------------------------------------------------

#[test]
fn a_first_fragment_refused_with_416_does_not_fix_the_total() {
    let mut s = Server::start(&[]);
    let id = s.create_session("/t.bin");
    // A stray first fragment, out of sync and naming another size.
    let r = s.fragment(&id, "/t.bin", 5, b"xxxxx", 100);
    assert_error(&r, 416, None, "a fragment past the next offset");
    assert_eq!(r.received(), Some(0));
    // After a restart too, the size is still open.
    s.restart();
    let data = random_bytes(10, 7);
    let r = s.fragment(&id, "/t.bin", 0, &data, data.len() as u64);
    assert_eq!(r.status, 200, "the correct first fragment: {r:?}");
    assert_eq!(r.received(), Some(10));
    assert_eq!(s.close(&id, "/t.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("t.bin")).unwrap(), data);
}

#[test]
fn a_create_session_that_fails_leaves_no_session_folder() {
    let fs_ = match Tmpfs::mount() {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED a_create_session_that_fails...: {why}");
            return;
        }
    };
    let data_dir = fs_.path().join("data");
    fs::create_dir_all(&data_dir).unwrap();
    let s = Server::start_at(&data_dir, &[]);
    let requests = data_dir.join("BITS-Sessions").join("Requests");
    let filler = fs_.path().join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        let mut n = 0;
        while f.write_all(&block).is_ok() && n < 1000 {
            n += 1;
        }
    }
    for _ in 0..3 {
        let r = s.send(&create_request("/full.bin"));
        assert_error(&r, 500, Some("0x80070070"), "Create-Session on a full disk");
    }
    let left: Vec<_> = fs::read_dir(&requests).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "a failed Create-Session left {:?}",
        left.iter().map(|e| e.file_name()).collect::<Vec<_>>()
    );
    fs::remove_file(&filler).unwrap();
    s.upload("/full.bin", b"room again", 10);
    drop(s);
}
