//! The reference receiver's deliveries by reference (issue 15, point 6): it reads the file named in
//! `BITS-Request-DataFile-Name` and writes the one named in `BITS-Response-DataFile-Name` only
//! beneath the folders it was told to trust (`--trust-dir`), never through a symbolic link, and
//! never touches a file outside them. Requests go straight to a real `bitsfarm receiver` (anyone
//! who can reach it can send these headers), and end to end through `bitsfarm serve` and
//! `bitsfarm farm`.

mod common;

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_bitsfarm");

/// A trusted folder and an outside one side by side, with a file in each.
struct Place {
    _root: TempDir,
    trusted: PathBuf,
    outside: PathBuf,
    /// `trusted/upload.bin`, a file the receiver may read.
    inside_file: PathBuf,
    /// `outside/secret.txt`, a file it must neither read nor write.
    secret: PathBuf,
}

const SECRET: &[u8] = b"outside the trusted folder; never copied, never changed\n";

fn place() -> Place {
    let root = tempfile::Builder::new()
        .prefix("bitsfarm-it-trust-")
        .tempdir()
        .expect("a temporary folder");
    // The receiver compares canonical paths, as the server names them.
    let base = std::fs::canonicalize(root.path()).expect("canonical temporary folder");
    let (trusted, outside) = (base.join("trusted"), base.join("outside"));
    std::fs::create_dir(&trusted).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let inside_file = trusted.join("upload.bin");
    std::fs::write(&inside_file, random_bytes(10_000, 1)).unwrap();
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    Place {
        _root: root,
        trusted,
        outside,
        inside_file,
        secret,
    }
}

/// A by-reference notification, as a server sends it (no body), straight to the receiver.
fn notify(
    r: &ReceiverProcess,
    key: &str,
    request: Option<&Path>,
    response: Option<&Path>,
) -> Response {
    let mut req = Request::new("POST", "/deliveries").header("Idempotency-Key", key);
    if let Some(p) = request {
        req = req.header("BITS-Request-DataFile-Name", &p.display().to_string());
    }
    if let Some(p) = response {
        req = req.header("BITS-Response-DataFile-Name", &p.display().to_string());
    }
    Conn::open(r.addr)
        .send(&req)
        .unwrap_or_else(|e| panic!("no answer from the receiver: {e}; log:\n{}", r.log()))
}

/// Nothing was stored, and nothing is left half-copied in the staging folder.
#[track_caller]
fn assert_nothing_stored(r: &ReceiverProcess, what: &str) {
    let stored = r.deliveries();
    assert!(stored.is_empty(), "{what}: stored {stored:?}");
    let staged: Vec<_> = std::fs::read_dir(r.dir.join(".bitsfarm").join("incoming"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "{what}: left in incoming: {staged:?}");
}

#[track_caller]
fn assert_refused(resp: &Response, what: &str) {
    assert_eq!(resp.status, 403, "{what}: {resp:?}");
    assert!(!resp.text().trim().is_empty(), "{what}: a refusal says why");
}

#[test]
fn by_reference_is_refused_until_a_folder_is_trusted() {
    let p = place();
    let r = ReceiverProcess::start();
    let resp = notify(&r, "k-untrusted", Some(&p.inside_file), None);
    assert_refused(&resp, "no --trust-dir");
    assert!(
        resp.text().contains("--trust-dir"),
        "the refusal names the flag that allows it: {:?}",
        resp.text()
    );
    assert_nothing_stored(&r, "no --trust-dir");

    // By value needs no trusted folder.
    let body = random_bytes(5000, 2);
    let resp = Conn::open(r.addr)
        .send(
            &Request::new("POST", "/deliveries")
                .header("Idempotency-Key", "k-by-value")
                .body(&body),
        )
        .unwrap();
    assert_eq!(resp.status, 200, "by value: {resp:?}");
    let stored = r.deliveries();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].content_sha256, sha256_hex(&body));
}

#[test]
fn a_request_file_outside_every_trusted_folder_is_refused() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    let mut names = vec![
        p.secret.clone(),
        // Lexically beneath the trusted folder, resolved outside it.
        p.trusted.join("..").join("outside").join("secret.txt"),
        // A sibling whose name merely starts with the trusted folder's.
        PathBuf::from(format!("{}-evil/secret.txt", p.trusted.display())),
        PathBuf::from("upload.bin"),
    ];
    if Path::new("/etc/hostname").is_file() {
        names.push("/etc/hostname".into());
    }
    let sibling = PathBuf::from(format!("{}-evil", p.trusted.display()));
    std::fs::create_dir(&sibling).unwrap();
    std::fs::write(sibling.join("secret.txt"), SECRET).unwrap();
    for (i, name) in names.iter().enumerate() {
        let resp = notify(&r, &format!("k-outside-{i}"), Some(name), None);
        assert_refused(&resp, &name.display().to_string());
    }
    assert_nothing_stored(&r, "request files outside the trusted folder");
    assert_eq!(std::fs::read(&p.secret).unwrap(), SECRET);
}

#[test]
fn a_request_file_reached_through_a_symlink_in_a_trusted_folder_is_refused() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    // A link to a folder outside, a link to a file outside, a relative link climbing out, and a
    // link that stays inside: the receiver follows none of them.
    symlink(&p.outside, p.trusted.join("etc")).unwrap();
    symlink(&p.secret, p.trusted.join("secret-link")).unwrap();
    std::fs::create_dir(p.trusted.join("sub")).unwrap();
    symlink("../../outside", p.trusted.join("sub").join("up")).unwrap();
    symlink(&p.inside_file, p.trusted.join("inside-link")).unwrap();
    let names = [
        p.trusted.join("etc").join("secret.txt"),
        p.trusted.join("secret-link"),
        p.trusted.join("sub").join("up").join("secret.txt"),
        p.trusted.join("inside-link"),
    ];
    for (i, name) in names.iter().enumerate() {
        let resp = notify(&r, &format!("k-link-{i}"), Some(name), None);
        assert_refused(&resp, &name.display().to_string());
    }
    assert_nothing_stored(&r, "request files through links");
}

#[test]
fn a_request_file_must_be_a_regular_file_of_one_link() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    std::fs::create_dir(p.trusted.join("folder")).unwrap();
    // A hard link is no link a lookup follows: it IS the outside file, under a name inside.
    std::fs::hard_link(&p.secret, p.trusted.join("hard-link")).unwrap();
    // Opening a FIFO for reading would wait for a writer forever.
    let fifo = p.trusted.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let t = Instant::now();
    for (i, name) in ["folder", "hard-link", "fifo"].iter().enumerate() {
        let resp = notify(
            &r,
            &format!("k-special-{i}"),
            Some(&p.trusted.join(name)),
            None,
        );
        assert_refused(&resp, name);
    }
    eprintln!("three refusals took {:?}", t.elapsed());
    assert_nothing_stored(&r, "not regular files");
}

#[test]
fn a_response_file_outside_every_trusted_folder_is_refused_and_the_outside_file_unchanged() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    symlink(&p.outside, p.trusted.join("etc")).unwrap();
    symlink(&p.secret, p.trusted.join("secret-link")).unwrap();
    let names = [
        p.secret.clone(),
        p.trusted.join("..").join("outside").join("secret.txt"),
        p.trusted.join("etc").join("secret.txt"),
        p.trusted.join("secret-link"),
        p.trusted.join("missing-folder").join("reply.bin"),
        p.trusted.clone(),
    ];
    for (i, name) in names.iter().enumerate() {
        let resp = notify(
            &r,
            &format!("k-reply-{i}"),
            Some(&p.inside_file),
            Some(name),
        );
        assert!(
            (400..500).contains(&resp.status),
            "{}: {resp:?}",
            name.display()
        );
        assert_eq!(
            std::fs::read(&p.secret).unwrap(),
            SECRET,
            "{}: the outside file changed",
            name.display()
        );
    }
    assert!(
        std::fs::symlink_metadata(p.trusted.join("secret-link"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the planted link is left as it was"
    );
    // Both names are checked before anything is stored.
    assert_nothing_stored(&r, "response files outside the trusted folder");
}

#[test]
fn a_response_file_hard_linked_to_an_outside_file_is_replaced_not_written_through() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    let reply = p.trusted.join("reply.bin");
    std::fs::hard_link(&p.secret, &reply).unwrap();
    let resp = notify(&r, "k-hard-reply", Some(&p.inside_file), Some(&reply));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        std::fs::read(&p.secret).unwrap(),
        SECRET,
        "the outside file was written through a hard link"
    );
    let stored = r.deliveries();
    assert_eq!(stored.len(), 1);
    assert_eq!(std::fs::read_to_string(&reply).unwrap(), stored[0].reply());
}

#[test]
fn a_delivery_beneath_a_trusted_folder_is_stored_and_its_reply_written() {
    let p = place();
    // The operator may name the trusted folder through a link of its own (a mount, say); the
    // server names the canonical path, and that is what is matched.
    let alias = p.outside.join("alias");
    symlink(&p.trusted, &alias).unwrap();
    let r = ReceiverProcess::start_trusting(&[&alias]);
    // The server's layout: BITS-Sessions/Requests/{id}/requestfile.bin, and a fresh folder for
    // the reply, BITS-Sessions/Replies/{id}/.
    let sessions = p.trusted.join("BITS-Sessions");
    let (req_dir, reply_dir) = (
        sessions.join("Requests").join("{S1}"),
        sessions.join("Replies").join("{S1}"),
    );
    std::fs::create_dir_all(&req_dir).unwrap();
    std::fs::create_dir_all(&reply_dir).unwrap();
    let data = random_bytes(300_000, 3);
    let upload = req_dir.join("requestfile.bin");
    std::fs::write(&upload, &data).unwrap();
    let reply = reply_dir.join("responsefile.bin");

    let resp = notify(&r, "k-good", Some(&upload), Some(&reply));
    assert_eq!(resp.status, 200, "{resp:?}; log:\n{}", r.log());
    let stored = r.deliveries();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].content_sha256, sha256_hex(&data));
    assert_eq!(std::fs::read_to_string(&reply).unwrap(), stored[0].reply());

    // A repeat (the server crashed after the first answer) finds the reply file there and
    // replaces it with the same reply.
    let resp = notify(&r, "k-good", Some(&upload), Some(&reply));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        r.metric("bitsfarm_receiver_duplicates_suppressed_total"),
        1.0
    );
    assert_eq!(std::fs::read_to_string(&reply).unwrap(), stored[0].reply());
    let left: Vec<_> = std::fs::read_dir(&reply_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "no temporary file left beside the reply: {left:?}"
    );
}

#[test]
fn a_server_whose_data_folder_is_not_trusted_gets_a_refusal_it_relays() {
    let p = place();
    let r = ReceiverProcess::start_trusting(&[&p.trusted]);
    let s = Server::start(&[
        "--notify-type",
        "by-reference",
        "--notify-url",
        &r.url("/deliveries"),
    ]);
    let data = random_bytes(70_000, 4);
    let path = "/up/a.bin";
    let id = s.create_session(path);
    let resp = s.fragment(&id, path, 0, &data, data.len() as u64);
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("BITS-Error-Context"), Some("0x7"), "{resp:?}");
    assert_nothing_stored(&r, "an untrusted server");
}

// ---------------------------------------------------------------------------------------------
// Where files go: at the upload's own path and name below --dir, the key in the record
// ---------------------------------------------------------------------------------------------

/// `bitsfarm upload FILE URL extra...`, run to its end (bounded by its no-progress timeout).
fn upload(file: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("upload")
        .arg(file)
        .arg(url)
        .args([
            "--no-resume",
            "--no-progress-timeout",
            "60",
            "--retry-delay",
            "1",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("bitsfarm upload runs")
}

/// The final report of an `upload --json` run.
fn final_report(out: &std::process::Output) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "done")
        .map(|e| e["report"].clone())
        .unwrap_or_else(|| {
            panic!(
                "no report: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// A delivery lands at its URL path below --dir; its key stays in its record; the receiver's
/// log, its reply and the client's summary say where it went; a different file sent to the same
/// URL is kept beside the first, never over it; the same file again is stored once.
#[test]
fn a_delivery_keeps_its_path_and_name_and_everyone_says_where() {
    let r = ReceiverProcess::start();
    let s = Server::start(&[
        "--notify-type",
        "by-value",
        "--notify-url",
        &r.url("/deliveries"),
    ]);
    let work = TempDir::new().unwrap();
    let file = work.path().join("app.dmp");
    let reply = work.path().join("reply.txt");
    let url = format!("http://{}/dumps/app.dmp", s.addr);
    let first = random_bytes(100_000, 31);
    std::fs::write(&file, &first).unwrap();
    let out = upload(&file, &url, &["--json", "--reply", reply.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = final_report(&out);

    let at = r.dir.join("dumps").join("app.dmp");
    assert_eq!(
        std::fs::read(&at).ok().map(|b| sha256_hex(&b)),
        Some(sha256_hex(&first)),
        "not at {}; log:\n{}",
        at.display(),
        r.log()
    );
    let stored = r.deliveries();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].key.starts_with("bf1-"), "{stored:?}");
    assert_eq!(stored[0].record["stored-path"], "dumps/app.dmp");
    assert_eq!(stored[0].content_sha256, sha256_hex(&first));
    let log = r.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&at.display().to_string()) && l.contains(&stored[0].key)),
        "the log names where the delivery went:\n{log}"
    );
    // The client: the URL path, that a backend took it, and the backend's word on where.
    assert_eq!(report["url_path"], "/dumps/app.dmp", "{report}");
    assert!(report["reply_url"].is_string(), "{report}");
    let said = report["backend_reply"].as_str().unwrap_or_default();
    assert!(said.contains("dumps/app.dmp"), "{report}");
    assert_eq!(std::fs::read_to_string(&reply).unwrap(), stored[0].reply());

    // Other bytes to the same URL: kept beside the first, which stays as it was.
    let second = random_bytes(80_000, 32);
    std::fs::write(&file, &second).unwrap();
    let out = upload(&file, &url, &["--reply", reply.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(
        file_sha256(&at),
        sha256_hex(&first),
        "the first is untouched"
    );
    let beside = r.dir.join("dumps").join("app-2.dmp");
    assert!(beside.is_file(), "{text}");
    assert_eq!(file_sha256(&beside), sha256_hex(&second), "{text}");
    assert!(
        text.contains("/dumps/app.dmp") && text.contains("dumps/app-2.dmp"),
        "the summary says where it went: {text}"
    );
    assert_eq!(r.deliveries().len(), 2);

    // The first again, as a server that lost its ledger sends it: the same key, stored once.
    let again = Conn::open(r.addr)
        .send(
            &Request::new("POST", "/deliveries")
                .header("Idempotency-Key", &stored[0].key)
                .header(
                    "BITS-Original-Request-URL",
                    stored[0].record["original-url"].as_str().unwrap(),
                )
                .body(&first),
        )
        .unwrap();
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.text(), stored[0].reply());
    assert_eq!(
        r.metric("bitsfarm_receiver_duplicates_suppressed_total"),
        1.0
    );
    assert_eq!(r.deliveries().len(), 2);
    let mut names: Vec<_> = std::fs::read_dir(r.dir.join("dumps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["app-2.dmp", "app.dmp"]);
}

/// The URL path is a request like any other: it never leads outside --dir, through a link, or
/// into the receiver's own records.
#[test]
fn a_delivery_path_stays_below_the_folder_and_follows_no_link() {
    let p = place();
    let r = ReceiverProcess::start();
    symlink(&p.outside, r.dir.join("linked")).unwrap();
    std::fs::create_dir(r.dir.join("dumps")).unwrap();
    symlink(&p.secret, r.dir.join("dumps").join("app.dmp")).unwrap();
    let post = |key: &str, url: Option<&str>| {
        let mut req = Request::new("POST", "/deliveries").header("Idempotency-Key", key);
        if let Some(u) = url {
            req = req.header("BITS-Original-Request-URL", u);
        }
        Conn::open(r.addr)
            .send(&req.body(b"not for outside"))
            .unwrap_or_else(|e| panic!("no answer: {e}; log:\n{}", r.log()))
    };
    for (i, (url, status)) in [
        ("http://h/linked/x.bin", 403),
        ("http://h/a%2fb/x.bin", 400),
        ("http://h/a%5c..%5c..%5cx.bin", 400),
        ("http://h/.bitsfarm/deliveries/forged.json", 400),
        ("http://h/", 400),
        ("not a url", 400),
    ]
    .iter()
    .enumerate()
    {
        let resp = post(&format!("k-bad-{i}"), Some(url));
        assert_eq!(resp.status, *status, "{url}: {resp:?}");
        assert!(!resp.text().trim().is_empty(), "{url}: a refusal says why");
    }
    // Dots the URL resolves stay inside.
    let resp = post("k-dots", Some("http://h/%2e%2e/%2e%2e/up.bin"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(r.dir.join("up.bin").is_file());
    // A link where the file would go is not written through, nor replaced.
    let resp = post("k-link", Some("http://h/dumps/app.dmp"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(std::fs::read(&p.secret).unwrap(), SECRET);
    assert!(
        std::fs::symlink_metadata(r.dir.join("dumps").join("app.dmp"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(r.dir.join("dumps").join("app-2.dmp").is_file());
    // Without a URL (a server other than bitsfarm may send none), a delivery is named by its key.
    let resp = post("k-no-url", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(r.dir.join("k-no-url").is_file());
    let outside: Vec<_> = std::fs::read_dir(&p.outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(outside, [std::ffi::OsString::from("secret.txt")]);
    let mut beside: Vec<_> = std::fs::read_dir(r.dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["deliveries", "receiver.log"],
        "nothing above --dir"
    );
    assert_eq!(r.deliveries().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// `bitsfarm farm`: its receiver trusts exactly the members' data folders
// ---------------------------------------------------------------------------------------------

/// A farm of two members with two upload directories, each delivering by reference to the
/// receiver the farm runs for the loopback backend: every member's every data folder is trusted.
#[test]
fn a_farm_delivers_by_reference_to_its_receiver() {
    let base = free_port_block(4);
    let receiver_port = base + 3;
    let work = TempDir::new().unwrap();
    let manifest = work.path().join("farm.yaml");
    let dir = |path: &str| {
        format!(
            "  - path: {path}\n    backend:\n      url: http://127.0.0.1:{receiver_port}{path}\n      notification: ByReference\n"
        )
    };
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: t\nspec:\n  replicas: 2\n  directories:\n{}{}",
            dir("/a"),
            dir("/b")
        ),
    )
    .unwrap();
    let data_dir = work.path().join("farm");
    let mut farm = FarmProcess(
        Command::new(BIN)
            .args(["farm", "-f"])
            .arg(&manifest)
            .args(["--shared", &format!("127.0.0.1:{base}"), "--data-dir"])
            .arg(&data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting bitsfarm farm"),
    );
    let lines = lines_of(farm.0.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the farm did not get ready: {seen:#?}"),
        }
    }
    let mut expected = Vec::new();
    for member in 0..2u16 {
        let addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", base + 1 + member).parse().unwrap();
        for (i, path) in ["/a/x.bin", "/b/x.bin"].iter().enumerate() {
            let data = random_bytes(50_000, u64::from(member) * 10 + i as u64);
            let mut c = Conn::open(addr);
            let created = c.send(&create_request(path)).unwrap();
            assert_eq!(created.status, 200, "{created:?}");
            let id = created.header("BITS-Session-Id").unwrap().to_string();
            let r = c
                .send(&fragment_request(&id, path, 0, &data, data.len() as u64))
                .unwrap();
            assert_eq!(r.status, 200, "member {member} {path}: {r:?}");
            let reply_url = r.header("BITS-Reply-URL").unwrap().to_string();
            let reply = c.send(&Request::new("GET", &reply_url)).unwrap();
            assert_eq!(reply.status, 200, "{reply:?}");
            assert!(
                reply.text().contains(&sha256_hex(&data)),
                "the reply is the receiver's: {:?}",
                reply.text()
            );
            expected.push(sha256_hex(&data));
        }
    }
    let received = data_dir.join(format!("received-{receiver_port}"));
    let mut got: Vec<String> = stored_deliveries(&received)
        .into_iter()
        .map(|d| d.content_sha256)
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "one copy of each upload");
}

/// `farm --receiver`: the farm's log (its receiver's lines among them) names where each upload
/// went, below the receiver's folder at the upload's own path.
#[test]
fn farm_with_a_receiver_logs_where_each_upload_went() {
    let base = free_port_block(5);
    let work = TempDir::new().unwrap();
    let data_dir = work.path().join("farm");
    let mut farm = FarmProcess(
        Command::new(BIN)
            .args([
                "farm",
                "--receiver",
                "--shared",
                &format!("127.0.0.1:{base}"),
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bitsfarm farm"),
    );
    let lines = lines_of(farm.0.stdout.take().unwrap());
    let log = lines_of(farm.0.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the farm did not get ready: {seen:#?}"),
        }
    }
    let data = random_bytes(200_000, 41);
    let file = work.path().join("app.dmp");
    std::fs::write(&file, &data).unwrap();
    let out = upload(
        &file,
        &format!("http://127.0.0.1:{base}/dumps/app.dmp"),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = data_dir
        .join(format!("received-{}", base + 4))
        .join("dumps")
        .join("app.dmp");
    let wanted = at.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut logged = Vec::new();
    while !logged.iter().any(|l: &String| l.contains(&wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(l) => logged.push(l),
            Err(_) => panic!("the farm's log never named {wanted}: {logged:#?}"),
        }
    }
    assert_eq!(file_sha256(&at), sha256_hex(&data));
    drop(farm);
}

/// A running `bitsfarm farm`, told to exit on drop (a failing test included), so that its
/// members and receiver stop with it; killed if it will not.
struct FarmProcess(Child);

impl Drop for FarmProcess {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "exit");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
