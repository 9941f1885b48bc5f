//! Security and hostile conditions, through real HTTP against the real binary: authentication and
//! session ownership, session/fragment/connection limits, idle keep-alive, a full disk, TLS.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A server with Basic users alice/wonderland and bob/builder, and the token `tok-carol` for carol.
struct AuthServer {
    s: Server,
    _creds: tempfile::TempDir,
}

fn auth_server(extra: &[&str]) -> AuthServer {
    let creds = tempfile::tempdir().unwrap();
    let users = creds.path().join("users");
    let tokens = creds.path().join("tokens");
    fs::write(
        &users,
        format!(
            "# bitsfarm users\n{}\n{}\n",
            passwd("alice", "wonderland"),
            passwd("bob", "builder")
        ),
    )
    .unwrap();
    fs::write(&tokens, "carol:tok-carol\n").unwrap();
    let (u, t) = (users.display().to_string(), tokens.display().to_string());
    let mut args = vec!["--users-file", u.as_str(), "--tokens-file", t.as_str()];
    args.extend_from_slice(extra);
    AuthServer {
        s: Server::start(&args),
        _creds: creds,
    }
}

fn as_user(req: Request, auth: &str) -> Request {
    req.header("Authorization", auth)
}

fn create_as(s: &Server, path: &str, auth: &str) -> String {
    let r = s.send(&as_user(create_request(path), auth));
    assert_eq!(r.status, 200, "Create-Session as {auth}: {r:?}");
    r.header("BITS-Session-Id").unwrap().to_string()
}

fn assert_challenge(r: &Response, what: &str) {
    assert_eq!(r.status, 401, "{what}: {r:?}");
    let challenges = r.header_all("WWW-Authenticate");
    assert!(
        challenges.contains(&"Basic realm=\"bitsfarm\""),
        "{what}: challenges {challenges:?}"
    );
}

#[test]
fn missing_credentials_get_401_with_a_basic_challenge_on_every_packet() {
    let a = auth_server(&[]);
    let s = &a.s;
    let r = s.send(&create_request("/up/a.bin"));
    assert_challenge(&r, "Create-Session without credentials");
    assert_eq!(r.header("BITS-Packet-Type"), Some("Ack"), "{r:?}");
    assert_eq!(r.error_code(), Some("0x80190191"), "{r:?}");
    assert_challenge(&s.ping(), "Ping without credentials");
    assert_challenge(&s.get("/up/a.bin"), "GET without credentials");
    // A valid session id is no substitute for credentials.
    let id = create_as(s, "/up/a.bin", &basic("alice", "wonderland"));
    let r = s.fragment(&id, "/up/a.bin", 0, b"hello", 5);
    assert_challenge(&r, "Fragment without credentials");
    let r = s.close(&id, "/up/a.bin");
    assert_challenge(&r, "Close-Session without credentials");
    // Health stays open for probes.
    assert_eq!(s.get("/healthz").status, 200);
    assert!(
        !s.data_dir.join("up/a.bin").exists(),
        "nothing was committed without credentials"
    );
}

#[test]
fn wrong_password_unknown_user_and_wrong_token_get_401() {
    let a = auth_server(&[]);
    let s = &a.s;
    for (auth, what) in [
        (basic("alice", "wrong"), "wrong password"),
        (basic("mallory", "wonderland"), "unknown user"),
        (basic("alice", ""), "empty password"),
        ("Bearer tok-wrong".to_string(), "wrong token"),
        ("Basic not-base64!".to_string(), "garbage"),
        ("Negotiate abc".to_string(), "unsupported scheme"),
    ] {
        let r = s.send(&as_user(create_request("/x.bin"), &auth));
        assert_challenge(&r, what);
    }
    let log = s.log_tail();
    assert!(
        !log.contains("wonderland"),
        "passwords never appear in the log"
    );
}

#[test]
fn right_password_and_token_upload_and_commit() {
    let a = auth_server(&[]);
    let s = &a.s;
    let alice = basic("alice", "wonderland");
    let data = random_bytes(50_000, 9);
    let id = create_as(s, "/up/alice.bin", &alice);
    for (i, chunk) in data.chunks(20_000).enumerate() {
        let start = (i * 20_000) as u64;
        let r = s.send(&as_user(
            fragment_request(&id, "/up/alice.bin", start, chunk, data.len() as u64),
            &alice,
        ));
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = s.send(&as_user(
        Request::bits("Close-Session", "/up/alice.bin").header("BITS-Session-Id", &id),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        file_sha256(&s.data_dir.join("up/alice.bin")),
        sha256_hex(&data)
    );
    // Bearer token.
    let carol = "Bearer tok-carol";
    assert_eq!(
        s.send(&as_user(Request::bits("Ping", "/"), carol)).status,
        200
    );
    let id = create_as(s, "/up/carol.bin", carol);
    let r = s.send(&as_user(
        fragment_request(&id, "/up/carol.bin", 0, b"carol", 5),
        carol,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.send(&as_user(
        Request::bits("Close-Session", "/up/carol.bin").header("BITS-Session-Id", &id),
        carol,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(fs::read(s.data_dir.join("up/carol.bin")).unwrap(), b"carol");
    assert!(
        !s.log_tail().contains("tok-carol"),
        "tokens never appear in the log"
    );
}

#[test]
fn another_users_session_id_is_answered_like_an_unknown_session() {
    let a = auth_server(&[]);
    let s = &a.s;
    let (alice, bob) = (basic("alice", "wonderland"), basic("bob", "builder"));
    let path = "/up/mine.bin";
    let id = create_as(s, path, &alice);
    let r = s.send(&as_user(
        fragment_request(&id, path, 0, b"0123456789", 20),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    let unknown = "{00000000-0000-4000-8000-000000000000}";
    for (sid, who) in [
        (id.as_str(), "bob with alice's id"),
        (unknown, "unknown id"),
    ] {
        let r = s.send(&as_user(
            fragment_request(sid, path, 10, b"abcdefghij", 20),
            &bob,
        ));
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Fragment: {who}"),
        );
        let r = s.send(&as_user(
            Request::bits("Close-Session", path).header("BITS-Session-Id", sid),
            &bob,
        ));
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Close: {who}"),
        );
        let r = s.send(&as_user(
            Request::bits("Cancel-Session", path).header("BITS-Session-Id", sid),
            &bob,
        ));
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Cancel: {who}"),
        );
    }
    // The token user is another user too.
    let r = s.send(&as_user(
        fragment_request(&id, path, 10, b"abcdefghij", 20),
        "Bearer tok-carol",
    ));
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "carol with alice's id",
    );
    // Alice's session is untouched: she finishes it.
    let r = s.send(&as_user(
        fragment_request(&id, path, 10, b"ABCDEFGHIJ", 20),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.received(), Some(20));
    let r = s.send(&as_user(
        Request::bits("Close-Session", path).header("BITS-Session-Id", &id),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        fs::read(s.data_dir.join("up/mine.bin")).unwrap(),
        b"0123456789ABCDEFGHIJ"
    );
    // The owner is stored with the session (whose record, closed, is its tombstone).
    let record = fs::read_to_string(s.session_dir(&id).join("closed.json")).unwrap();
    assert!(record.contains("\"owner\": \"alice\""), "{record}");
}

#[test]
fn sessions_survive_a_restart_with_their_owner() {
    let mut a = auth_server(&[]);
    let (alice, bob) = (basic("alice", "wonderland"), basic("bob", "builder"));
    let path = "/r.bin";
    let id = create_as(&a.s, path, &alice);
    a.s.restart();
    let s = &a.s;
    let r = s.send(&as_user(fragment_request(&id, path, 0, b"xy", 2), &bob));
    assert_error(&r, 500, Some(BG_E_SESSION_NOT_FOUND), "bob after restart");
    let r = s.send(&as_user(fragment_request(&id, path, 0, b"xy", 2), &alice));
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn per_user_session_limit_refuses_with_503_and_frees_on_close() {
    let a = auth_server(&["--max-sessions-per-user", "2"]);
    let s = &a.s;
    let (alice, bob) = (basic("alice", "wonderland"), basic("bob", "builder"));
    let first = create_as(s, "/l1.bin", &alice);
    let _second = create_as(s, "/l2.bin", &alice);
    let r = s.send(&as_user(create_request("/l3.bin"), &alice));
    assert_error(&r, 503, Some("0x801901F7"), "alice's third session");
    // Another user has limits of their own.
    create_as(s, "/b1.bin", &bob);
    // Cancelling one frees a slot.
    let r = s.send(&as_user(
        Request::bits("Cancel-Session", "/l1.bin").header("BITS-Session-Id", &first),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    create_as(s, "/l3.bin", &alice);
}

#[test]
fn per_server_session_limit_counts_everyone() {
    let s = Server::start(&["--max-sessions", "2"]);
    let a = s.create_session("/a.bin");
    s.create_session("/b.bin");
    let r = s.send(&create_request("/c.bin"));
    assert_error(&r, 503, Some("0x801901F7"), "third session on the server");
    // Completing a session (Close) frees its slot.
    s.fragment(&a, "/a.bin", 0, b"a", 1);
    assert_eq!(s.close(&a, "/a.bin").status, 200);
    s.create_session("/c.bin");
}

#[test]
fn fragments_over_the_limit_get_413_with_bg_e_too_large() {
    let s = Server::start(&["--max-fragment-size", "1000"]);
    let id = s.create_session("/f.bin");
    let data = random_bytes(3000, 1);
    let r = s.fragment(&id, "/f.bin", 0, &data[..1001], 3000);
    assert_error(&r, 413, Some(BG_E_TOO_LARGE), "fragment of 1001 bytes");
    // The client halves its fragments and goes on.
    s.send_fragments(&id, "/f.bin", &data, 0, 1000);
    assert_eq!(s.close(&id, "/f.bin").status, 200);
    assert_eq!(file_sha256(&s.data_dir.join("f.bin")), sha256_hex(&data));
}

/// `bitsfarm_auth_failures_total{reason}` and `bitsfarm_limit_refusals_total{limit}`, read from
/// the real server's /metrics after real refusals.
#[test]
fn refusals_are_counted_by_reason_and_limit_never_by_user() {
    let a = auth_server(&[
        "--max-sessions-per-user",
        "1",
        "--max-sessions",
        "3",
        "--max-fragment-size",
        "1000",
        "--max-upload-size",
        "5000",
    ]);
    let s = &a.s;
    let auth = |reason: &str| {
        s.metric(&format!(
            "bitsfarm_auth_failures_total{{reason=\"{reason}\"}}"
        ))
    };
    let limit = |l: &str| s.metric(&format!("bitsfarm_limit_refusals_total{{limit=\"{l}\"}}"));
    // Every series is there at 0 before the first refusal (`metric` would also read 0 for a
    // missing series, hence the look at the text).
    let text = s.metrics();
    for series in [
        "bitsfarm_auth_failures_total{reason=\"missing\"} 0",
        "bitsfarm_auth_failures_total{reason=\"wrong\"} 0",
        "bitsfarm_limit_refusals_total{limit=\"sessions_per_user\"} 0",
        "bitsfarm_limit_refusals_total{limit=\"fragment_size\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }

    // Missing credentials: two packets.
    assert_challenge(&s.send(&create_request("/m/a.bin")), "no credentials");
    assert_challenge(&s.ping(), "Ping without credentials");
    // Wrong credentials of three kinds, one malformed header, one scheme that is not offered.
    for (header, what) in [
        (basic("alice", "wrong"), "wrong password"),
        (basic("mallory", "wonderland"), "unknown user"),
        ("Bearer tok-wrong".to_string(), "wrong token"),
        ("Basic not-base64!".to_string(), "garbage"),
        ("Negotiate abc".to_string(), "unsupported scheme"),
    ] {
        assert_challenge(&s.send(&as_user(create_request("/m/b.bin"), &header)), what);
    }
    assert_eq!(auth("missing"), 2.0);
    assert_eq!(auth("wrong"), 3.0, "unknown user, wrong password and token");
    assert_eq!(auth("malformed"), 1.0);
    assert_eq!(auth("unsupported_scheme"), 1.0);
    assert_eq!(limit("sessions_per_user") + limit("sessions"), 0.0);

    // Alice's second session is over her own limit; the fourth session is over the server's.
    let (alice, bob) = (basic("alice", "wonderland"), basic("bob", "builder"));
    let id = create_as(s, "/m/1.bin", &alice);
    let r = s.send(&as_user(create_request("/m/2.bin"), &alice));
    assert_error(&r, 503, Some("0x801901F7"), "alice's second session");
    create_as(s, "/m/3.bin", &bob);
    create_as(s, "/m/4.bin", "Bearer tok-carol");
    let r = s.send(&as_user(create_request("/m/5.bin"), &bob));
    assert_error(
        &r,
        503,
        Some("0x801901F7"),
        "a fourth session on the server",
    );
    assert_eq!(limit("sessions_per_user"), 1.0);
    assert_eq!(limit("sessions"), 1.0);

    // A fragment over the fragment limit, then an upload over the upload size.
    let r = s.send(&as_user(
        fragment_request(&id, "/m/1.bin", 0, &[7u8; 1001], 1001),
        &alice,
    ));
    assert_error(&r, 413, Some(BG_E_TOO_LARGE), "fragment of 1001 bytes");
    let r = s.send(&as_user(
        fragment_request(&id, "/m/1.bin", 0, b"0123456789", 6000),
        &alice,
    ));
    assert_error(&r, 500, Some(BG_E_TOO_LARGE), "an upload of 6000 bytes");
    assert_eq!(limit("fragment_size"), 1.0);
    assert_eq!(limit("upload_size"), 1.0);
    // Accepted requests count nothing.
    let r = s.send(&as_user(
        fragment_request(&id, "/m/1.bin", 0, b"ok", 2),
        &alice,
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(auth("missing") + auth("wrong"), 5.0);
    assert_eq!(limit("fragment_size") + limit("upload_size"), 2.0);

    // No user name or credential ever becomes part of the metrics.
    let text = s.metrics();
    for secret in ["alice", "bob", "carol", "mallory", "wonderland", "tok-"] {
        assert!(!text.contains(secret), "{secret:?} in /metrics:\n{text}");
    }
}

#[test]
fn connections_over_the_cap_wait_until_one_closes() {
    // One address may hold them all here (by default it gets a quarter: tests/hostile.rs).
    let s = Server::start(&[
        "--max-connections",
        "2",
        "--max-connections-per-address",
        "0",
    ]);
    let mut c1 = s.connect();
    let mut c2 = s.connect();
    assert_eq!(c1.send(&Request::bits("Ping", "/")).unwrap().status, 200);
    assert_eq!(c2.send(&Request::bits("Ping", "/")).unwrap().status, 200);
    // The third connection is not served while two are open.
    let mut c3 = s.connect();
    c3.write_raw(&Request::bits("Ping", "/").to_bytes(s.addr))
        .unwrap();
    c3.set_read_timeout(Duration::from_millis(800));
    assert!(
        c3.read_response(false).is_err(),
        "a third connection was served past --max-connections 2"
    );
    drop(c1);
    c3.set_read_timeout(IO_TIMEOUT);
    let r = c3.read_response(false).expect("served once a slot is free");
    assert_eq!(r.status, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let s = Server::start(&["--idle-timeout", "1"]);
    let mut c = s.connect();
    assert_eq!(c.send(&Request::bits("Ping", "/")).unwrap().status, 200);
    let started = Instant::now();
    let mut seen = Vec::new();
    assert!(
        c.wait_closed(Duration::from_secs(10), &mut seen),
        "an idle connection stayed open"
    );
    assert!(seen.is_empty(), "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(800));
    // A busy connection is not cut: requests one after another within the timeout.
    let mut c = s.connect();
    for _ in 0..4 {
        assert_eq!(c.send(&Request::bits("Ping", "/")).unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
}

// ---------------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_disk_answers_500_disk_full_and_the_retry_succeeds_once_space_is_back() {
    let fs_ = match Tmpfs::mount() {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED a_full_disk...: {why}");
            return;
        }
    };
    let data_dir = fs_.path().join("data");
    fs::create_dir_all(&data_dir).unwrap();
    let s = Server::start_at(&data_dir, &[]);
    let data = random_bytes(600_000, 4);
    let id = s.create_session("/big.bin");
    let r = s.fragment(&id, "/big.bin", 0, &data[..300_000], data.len() as u64);
    assert_eq!(r.status, 200, "{r:?}");
    // Fill the disk.
    let filler: PathBuf = fs_.path().join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let r = s.fragment(
        &id,
        "/big.bin",
        300_000,
        &data[300_000..],
        data.len() as u64,
    );
    assert_error(&r, 500, Some("0x80070070"), "fragment on a full disk");
    // The session is intact: the next expected offset is still 300000.
    let data_file = s.session_dir(&id).join("requestfile.bin");
    assert_eq!(fs::metadata(&data_file).unwrap().len(), 300_000);
    // Space comes back; the client's retry of the same fragment succeeds.
    fs::remove_file(&filler).unwrap();
    let r = s.fragment(
        &id,
        "/big.bin",
        300_000,
        &data[300_000..],
        data.len() as u64,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.received(), Some(data.len() as u64));
    assert_eq!(s.close(&id, "/big.bin").status, 200);
    assert_eq!(file_sha256(&data_dir.join("big.bin")), sha256_hex(&data));
    drop(s);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A self-signed certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("rcgen");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(IO_TIMEOUT)
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one BITS packet over https; returns the status and headers.
async fn bits_https(
    client: &reqwest::Client,
    url: &str,
    packet: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(u16, reqwest::header::HeaderMap), reqwest::Error> {
    let mut req = client
        .request(reqwest::Method::from_bytes(b"BITS_POST").unwrap(), url)
        .header("BITS-Packet-Type", packet)
        .header("Content-Length", body.len().to_string());
    for (n, v) in headers {
        req = req.header(*n, v);
    }
    let r = req.body(body).send().await?;
    Ok((r.status().as_u16(), r.headers().clone()))
}

#[test]
fn tls_upload_with_a_self_signed_certificate_and_reload_on_change() {
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    let (cert_a, key_a) = self_signed();
    write_atomic(&cert_path, &cert_a);
    write_atomic(&key_path, &key_a);
    let (c, k) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let s = Server::start(&["--tls-cert", &c, "--tls-key", &k]);
    assert!(s.first_line.contains("https://"), "{}", s.first_line);
    let base = format!("https://127.0.0.1:{}", s.addr.port());
    let url = format!("{base}/tls/file.bin");
    let data = random_bytes(100_000, 7);
    let rt = runtime();
    rt.block_on(async {
        let client = https_client(&cert_a);
        let (status, h) = bits_https(
            &client,
            &url,
            "Create-Session",
            &[("BITS-Supported-Protocols", GUID.to_string())],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let id = h["bits-session-id"].to_str().unwrap().to_string();
        let total = data.len();
        let (status, h) = bits_https(
            &client,
            &url,
            "Fragment",
            &[
                ("BITS-Session-Id", id.clone()),
                ("Content-Range", format!("bytes 0-{}/{total}", total - 1)),
            ],
            data.clone(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{h:?}");
        let (status, _) = bits_https(
            &client,
            &url,
            "Close-Session",
            &[("BITS-Session-Id", id)],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    });
    assert_eq!(
        file_sha256(&s.data_dir.join("tls/file.bin")),
        sha256_hex(&data)
    );
    // Plain HTTP on the TLS port gets no BITS answer.
    let mut conn = s.connect();
    let _ = conn.write_raw(&Request::bits("Ping", "/").to_bytes(s.addr));
    assert!(
        conn.read_response(false)
            .map(|r| r.status != 200)
            .unwrap_or(true),
        "plain HTTP was served on the TLS listener"
    );
    // Rotation: new files, no restart. A client trusting only the new certificate gets in.
    let (cert_b, key_b) = self_signed();
    write_atomic(&key_path, &key_b);
    write_atomic(&cert_path, &cert_b);
    let ok = rt.block_on(async {
        let client = https_client(&cert_b);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok((200, _)) =
                bits_https(&client, &format!("{base}/"), "Ping", &[], Vec::new()).await
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    });
    assert!(
        ok,
        "the rotated certificate was not served; log:\n{}",
        s.log_tail()
    );
    let old = rt.block_on(async {
        bits_https(
            &https_client(&cert_a),
            &format!("{base}/"),
            "Ping",
            &[],
            Vec::new(),
        )
        .await
    });
    assert!(old.is_err(), "the old certificate is still served");
}

// ---------------------------------------------------------------------------------------------
// Backend credentials and a custom CA
// ---------------------------------------------------------------------------------------------

/// An https backend that answers every request 200 and reports each request head it saw.
fn https_backend(cert_pem: &str, key_pem: &str) -> (u16, std::sync::mpsc::Receiver<String>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 << 10];
                let head_end = loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(p + 4);
                    }
                };
                let Some(head_end) = head_end else { continue };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let mut have = buf.len() - head_end;
                while have < len {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => have += n,
                    }
                }
                let _ = tx.send(head);
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            }
        });
    });
    (port, rx)
}

#[test]
fn backend_calls_carry_the_header_from_a_file_over_https_with_a_custom_ca() {
    let (cert, key) = self_signed();
    let (port, heads) = https_backend(&cert, &key);
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("ca.pem");
    let header = files.path().join("backend-auth");
    fs::write(&ca, &cert).unwrap();
    fs::write(
        &header,
        "# the backend's token\nAuthorization: Bearer backend-secret-42\n",
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{port}/in");
    let (ca_s, header_s) = (ca.display().to_string(), header.display().to_string());
    let s = Server::start(&[
        "--notify-type",
        "by-value",
        "--notify-url",
        &url,
        "--notify-ca-file",
        &ca_s,
        "--notify-header-file",
        &header_s,
    ]);
    let id = s.create_session("/n/file.bin");
    let r = s.fragment(&id, "/n/file.bin", 0, b"payload", 7);
    assert_eq!(r.status, 200, "{r:?}\nlog:\n{}", s.log_tail());
    let head = heads
        .recv_timeout(IO_TIMEOUT)
        .expect("the backend was called");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("authorization: Bearer backend-secret-42")),
        "{head}"
    );
    assert_eq!(s.close(&id, "/n/file.bin").status, 200);
    assert!(
        !s.log_tail().contains("backend-secret-42"),
        "the backend credential appeared in the log"
    );
}

#[test]
fn unusable_security_files_stop_the_server_at_start() {
    let files = tempfile::tempdir().unwrap();
    let bad = files.path().join("bad");
    fs::write(&bad, "alice:plaintext-password\n").unwrap();
    let b = bad.display().to_string();
    for args in [
        vec!["--users-file", b.as_str()],
        vec!["--tls-cert", b.as_str(), "--tls-key", b.as_str()],
        vec!["--notify-ca-file", b.as_str()],
        vec!["--users-file", "/nonexistent/users"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(files.path().join("data"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("plaintext-password"), "{err}");
    }
}

#[test]
fn with_authentication_drain_is_not_offered_on_the_upload_address() {
    let a = auth_server(&[]);
    let s = &a.s;
    let r = s.send(&Request::new("POST", "/drain"));
    assert_eq!(r.status, 401, "{r:?}");
    let r = s.send(&as_user(
        Request::new("POST", "/drain"),
        &basic("alice", "wonderland"),
    ));
    assert_ne!(r.status, 200, "an uploader drained the server: {r:?}");
    // Still taking sessions.
    create_as(s, "/still-open.bin", &basic("alice", "wonderland"));
}

/// Drain is an operator's switch, never a client's: with authentication off (the default) and no
/// admin address, `POST /drain` on the upload address is no route at all, and the server goes on
/// taking sessions. `GET /drain` only reads (it is served where `/metrics` is) and drains nothing.
#[test]
fn drain_is_not_served_on_the_upload_address() {
    let mut s = Server::start(&[]);
    for target in ["/drain", "/drain?stay=true", "/drain?cancel=true"] {
        let r = s.send(&Request::new("POST", target));
        assert!(
            matches!(r.status, 404 | 405),
            "POST {target} on the upload address: {r:?}"
        );
    }
    let r = s.get("/drain");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"draining\":false"), "{}", r.text());
    assert_eq!(
        s.get("/readyz").status,
        200,
        "the server must still be ready"
    );
    s.create_session("/still/open.bin");
    // An idle drained server would have exited by now.
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.is_running(), "the server stopped");
}

/// With an admin address, drain is served there and only there.
#[test]
fn drain_is_served_on_the_admin_address_alone() {
    let s = Server::start(&["--admin-listen", "127.0.0.1:0"]);
    let r = s.send(&Request::new("POST", "/drain?stay=true"));
    assert!(
        matches!(r.status, 404 | 405),
        "POST /drain on the upload address: {r:?}"
    );
    s.create_session("/before.bin");
    let r = s
        .connect_admin()
        .send(&Request::new("POST", "/drain?stay=true"))
        .expect("POST /drain on the admin address");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("\"draining\":true"), "{}", r.text());
    let ready = s
        .connect_admin()
        .send(&Request::new("GET", "/readyz"))
        .expect("GET /readyz");
    assert_eq!(ready.status, 503, "a draining server is not ready");
    let r = s.send(&create_request("/after.bin"));
    assert_error(&r, 503, Some("0x801901F7"), "Create-Session while draining");
}

/// An address that keeps sending wrong passwords is slowed down: after the free failures its
/// credentials are not checked (503 with `Retry-After`, which a BITS client retries with its job
/// intact), except those it was already using, so clients sharing the address keep uploading.
#[test]
fn an_address_that_keeps_failing_gets_503_without_a_check_but_keeps_what_worked() {
    let a = auth_server(&[]);
    let s = &a.s;
    let (alice, bob) = (basic("alice", "wonderland"), basic("bob", "builder"));
    let id = create_as(s, "/throttle/a.bin", &alice);
    // Five free failures, and the sixth, which is checked and starts the penalty.
    for i in 0..6 {
        let r = s.send(&as_user(
            create_request("/throttle/x.bin"),
            &basic("alice", &format!("guess-{i}")),
        ));
        assert_challenge(&r, &format!("wrong password {i}"));
    }
    let t = Instant::now();
    let r = s.send(&as_user(
        create_request("/throttle/x.bin"),
        &basic("alice", "guess-7"),
    ));
    assert_error(&r, 503, Some("0x801901F7"), "a guess in the penalty");
    assert!(
        r.header("Retry-After")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|secs| (1..=60).contains(&secs)),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered without a check"
    );
    // Bob has not worked from this address: not checked either.
    let r = s.send(&as_user(create_request("/throttle/b.bin"), &bob));
    assert_error(&r, 503, Some("0x801901F7"), "bob during the penalty");
    let r = s.send(&as_user(Request::new("GET", "/throttle/a.bin"), &bob));
    assert_eq!(r.status, 503, "a GET during the penalty: {r:?}");
    // Alice has: her upload goes on.
    let r = s.send(&as_user(
        fragment_request(&id, "/throttle/a.bin", 0, b"data", 4),
        &alice,
    ));
    assert_eq!(r.status, 200, "alice during the penalty: {r:?}");
    assert_eq!(
        s.metric("bitsfarm_auth_failures_total{reason=\"wrong\"}"),
        6.0
    );
    assert_eq!(
        s.metric("bitsfarm_auth_failures_total{reason=\"throttled\"}"),
        3.0
    );
    assert_eq!(
        s.metric("bitsfarm_auth_failures_total{reason=\"busy\"}"),
        0.0
    );
}
