//! The BITS upload protocol through real HTTP against the real `bitsfarm` binary.
//!
//! Every test starts its own server on 127.0.0.1 with its own temporary data folder.

mod common;

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const OTHER_GUID: &str = "{00000000-1111-2222-3333-444444444444}";

fn is_session_id(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 38
        && b[0] == b'{'
        && b[37] == b'}'
        && v[1..37]
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, 'A'..='F' | '-'))
}

/// Files and folders in the data folder outside `BITS-Sessions`.
fn outside_sessions(s: &Server) -> Vec<PathBuf> {
    tree(&s.data_dir, &["BITS-Sessions"])
}

// ---------------------------------------------------------------------------------------------
// Ping and Create-Session
// ---------------------------------------------------------------------------------------------

#[test]
fn ping_is_acked() {
    let s = Server::start(&[]);
    let r = s.ping();
    assert_eq!(r.status, 200, "Ping: {r:?}");
    assert_ack_shape(&r, "Ping");
    assert_eq!(
        r.error_code(),
        None,
        "a successful Ack carries no error code"
    );
}

#[test]
fn several_packets_share_one_keep_alive_connection() {
    let s = Server::start(&[]);
    let data = random_bytes(3000, 1);
    let mut c = s.connect();
    let r = c.send(&Request::bits("Ping", "/ka.bin")).expect("Ping");
    assert_eq!(r.status, 200, "Ping: {r:?}");
    let r = c.send(&create_request("/ka.bin")).expect("Create-Session");
    assert_eq!(r.status, 200, "Create-Session: {r:?}");
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    for (i, part) in data.chunks(1000).enumerate() {
        let start = (i * 1000) as u64;
        let r = c
            .send(&fragment_request(&id, "/ka.bin", start, part, 3000))
            .expect("Fragment");
        assert_eq!(r.status, 200, "fragment {i}: {r:?}");
        assert_eq!(r.received(), Some(start + 1000), "fragment {i}");
    }
    // An error answer must not cost the connection either.
    let r = c
        .send(&Request::bits("Nonsense", "/ka.bin"))
        .expect("bad packet");
    assert_eq!(r.status, 400, "unknown packet: {r:?}");
    let r = c
        .send(&Request::bits("Close-Session", "/ka.bin").header("BITS-Session-Id", &id))
        .expect("Close-Session");
    assert_eq!(r.status, 200, "Close-Session: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("ka.bin")).unwrap(), data);
}

#[test]
fn create_session_ack_names_protocol_session_and_encoding() {
    let s = Server::start(&[]);
    let r = s.send(&create_request("/a.bin"));
    assert_eq!(r.status, 200, "Create-Session: {r:?}");
    assert_ack_shape(&r, "Create-Session");
    assert_eq!(
        r.header("BITS-Protocol"),
        Some(GUID),
        "BITS-Protocol: {r:?}"
    );
    let id = r.header("BITS-Session-Id").expect("BITS-Session-Id");
    assert!(
        is_session_id(id),
        "session id {id:?} is not an upper-case braced GUID"
    );
    assert_eq!(
        r.header("Accept-Encoding")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("identity"),
        "Accept-Encoding: {r:?}"
    );
    assert_eq!(
        r.header("BITS-Host-Id"),
        None,
        "no host id configured: {r:?}"
    );
    assert_eq!(r.header("BITS-Host-Id-Fallback-Timeout"), None, "{r:?}");
}

#[test]
fn create_session_accepts_space_or_comma_lists_in_any_case() {
    let s = Server::start(&[]);
    let lists = [
        format!("{OTHER_GUID} {GUID}"),
        format!("{OTHER_GUID},{GUID}"),
        format!("{OTHER_GUID}, {}", GUID.to_uppercase()),
        GUID.to_uppercase(),
        format!("{GUID} {OTHER_GUID}"),
    ];
    for (i, list) in lists.iter().enumerate() {
        let r = s.send(
            &Request::bits("Create-Session", &format!("/l{i}.bin"))
                .header("BITS-Supported-Protocols", list),
        );
        assert_eq!(r.status, 200, "protocol list {list:?}: {r:?}");
        assert_eq!(
            r.header("BITS-Protocol")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some(GUID),
            "protocol list {list:?}: {r:?}"
        );
    }
}

#[test]
fn create_session_without_common_protocol_is_400() {
    let s = Server::start(&[]);
    let r = s.send(
        &Request::bits("Create-Session", "/a.bin").header("BITS-Supported-Protocols", OTHER_GUID),
    );
    assert_error(&r, 400, Some(E_INVALIDARG), "no common protocol");
    assert_eq!(r.header("BITS-Protocol"), None, "{r:?}");
    assert_eq!(r.header("BITS-Session-Id"), None, "{r:?}");
}

#[test]
fn create_session_without_supported_protocols_is_400() {
    let s = Server::start(&[]);
    let r = s.send(&Request::bits("Create-Session", "/a.bin"));
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "missing BITS-Supported-Protocols",
    );
}

#[test]
fn create_session_with_host_id_sends_host_headers() {
    let s = Server::start(&["--host-id", "pod-0.example"]);
    let r = s.send(&create_request("/a.bin"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("BITS-Host-Id"), Some("pod-0.example"), "{r:?}");
    assert_eq!(
        r.header("BITS-Host-Id-Fallback-Timeout"),
        Some("86400"),
        "{r:?}"
    );
}

#[test]
fn host_id_fallback_timeout_follows_its_flag() {
    let s = Server::start(&[
        "--host-id",
        "pod-0.example",
        "--host-id-fallback-timeout",
        "110",
    ]);
    let r = s.send(&create_request("/a.bin"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("BITS-Host-Id"), Some("pod-0.example"), "{r:?}");
    assert_eq!(
        r.header("BITS-Host-Id-Fallback-Timeout"),
        Some("110"),
        "{r:?}"
    );
}

#[test]
fn two_sessions_get_different_ids() {
    let s = Server::start(&[]);
    let a = s.create_session("/a.bin");
    let b = s.create_session("/a.bin");
    let c = s.create_session("/c.bin");
    assert!(a != b && b != c && a != c, "ids repeat: {a} {b} {c}");
}

// ---------------------------------------------------------------------------------------------
// Packet and header validation
// ---------------------------------------------------------------------------------------------

#[test]
fn packet_types_are_case_insensitive() {
    let s = Server::start(&[]);
    let r = s.send(&Request::bits("PING", "/"));
    assert_eq!(r.status, 200, "PING: {r:?}");
    let r =
        s.send(&Request::bits("CREATE-SESSION", "/c.bin").header("BITS-Supported-Protocols", GUID));
    assert_eq!(r.status, 200, "CREATE-SESSION: {r:?}");
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    let r = s.send(
        &Request::bits("fragment", "/c.bin")
            .header("BITS-Session-Id", &id)
            .header("Content-Range", "bytes 0-3/4")
            .body(b"abcd"),
    );
    assert_eq!(r.status, 200, "fragment: {r:?}");
    assert_eq!(r.received(), Some(4));
    let r = s.send(&Request::bits("close-session", "/c.bin").header("BITS-Session-Id", &id));
    assert_eq!(r.status, 200, "close-session: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("c.bin")).unwrap(), b"abcd");

    let id = s.create_session("/d.bin");
    let r = s.send(&Request::bits("CANCEL-session", "/d.bin").header("BITS-Session-Id", &id));
    assert_eq!(r.status, 200, "CANCEL-session: {r:?}");
    // Header names are case-insensitive too.
    let r = s.send(
        &Request::new("BITS_POST", "/e.bin")
            .header("bits-packet-type", "Create-Session")
            .header("BITS-SUPPORTED-PROTOCOLS", GUID),
    );
    assert_eq!(r.status, 200, "odd header-name casing: {r:?}");
}

#[test]
fn unknown_packet_type_is_400() {
    let s = Server::start(&[]);
    for p in ["Create-Sessions", "Upload", "", "Ping2"] {
        let r = s.send(&Request::bits(p, "/a.bin"));
        assert_error(&r, 400, Some(E_INVALIDARG), &format!("packet type {p:?}"));
    }
}

#[test]
fn missing_packet_type_is_400() {
    let s = Server::start(&[]);
    let r = s.send(&Request::new("BITS_POST", "/a.bin").header("BITS-Supported-Protocols", GUID));
    assert_error(&r, 400, Some(E_INVALIDARG), "no BITS-Packet-Type");
}

/// Packets without a body may leave out `Content-Length` (RFC 9112 §6.3: no Content-Length and
/// no Transfer-Encoding in a request means no body), as a BITS client nobody here wrote does; a
/// Fragment still needs it (see protocol-decisions.md).
#[test]
fn bodiless_packets_without_content_length_are_served_and_a_fragment_is_not() {
    let s = Server::start(&[]);
    let r = s.send(&Request::bits("Ping", "/").no_auto_length());
    assert_eq!(r.status, 200, "Ping without Content-Length: {r:?}");
    let mut c = s.connect();
    let r = c.send(&create_request("/nl.bin").no_auto_length()).unwrap();
    assert_eq!(
        r.status, 200,
        "Create-Session without Content-Length: {r:?}"
    );
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    let r = c
        .send(&fragment_request(&id, "/nl.bin", 0, b"abc", 3))
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .send(
            &Request::bits("Close-Session", "/nl.bin")
                .header("BITS-Session-Id", &id)
                .no_auto_length(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "Close-Session without Content-Length: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("nl.bin")).unwrap(), b"abc");
    let id = s.create_session("/nl2.bin");
    let r = s.send(
        &Request::bits("Cancel-Session", "/nl2.bin")
            .header("BITS-Session-Id", &id)
            .no_auto_length(),
    );
    assert_eq!(
        r.status, 200,
        "Cancel-Session without Content-Length: {r:?}"
    );
    let id = s.create_session("/nl3.bin");
    let r = s.send(
        &Request::bits("Fragment", "/nl3.bin")
            .header("BITS-Session-Id", &id)
            .header("Content-Range", "bytes 0-2/3")
            .no_auto_length(),
    );
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Fragment without Content-Length",
    );
    // Chunked stays refused on every packet.
    let r = s.send(
        &Request::bits("Ping", "/")
            .header("Transfer-Encoding", "chunked")
            .no_auto_length()
            .body(b"0\r\n\r\n"),
    );
    assert_error(&r, 400, Some(E_INVALIDARG), "chunked Ping");
}

/// A header a proxy in front may read differently from us when it comes twice (first wins,
/// last wins, or joined) gets 400 instead of the first copy.
#[test]
fn a_duplicated_packet_type_session_range_or_authorization_is_400() {
    let s = Server::start(&[]);
    let id = s.create_session("/dup.bin");
    let cases = [
        (
            "BITS-Packet-Type",
            Request::bits("Ping", "/dup.bin").header("BITS-Packet-Type", "Create-Session"),
        ),
        (
            "BITS-Session-Id",
            fragment_request(&id, "/dup.bin", 0, b"ab", 2)
                .header("BITS-Session-Id", "{00000000-0000-0000-0000-000000000000}"),
        ),
        (
            "Content-Range",
            fragment_request(&id, "/dup.bin", 0, b"ab", 2).header("Content-Range", "bytes 0-1/3"),
        ),
        (
            "Authorization",
            Request::bits("Ping", "/dup.bin")
                .header("Authorization", "Basic YTpi")
                .header("Authorization", "Basic Yzpk"),
        ),
    ];
    for (name, req) in cases {
        let r = s.send(&req);
        assert_error(&r, 400, Some(E_INVALIDARG), &format!("two {name} headers"));
        assert!(r.header("BITS-Error-Context").is_some(), "{name}: {r:?}");
    }
    // Nothing of the refused fragments was stored.
    let r = s.fragment(&id, "/dup.bin", 0, b"ab", 2);
    assert_eq!(r.received(), Some(2), "{r:?}");
}

/// RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two, is 400; HTTP/1.0 needs none.
#[test]
fn an_http_1_1_request_without_host_is_400() {
    let s = Server::start(&[]);
    let mut c = s.connect();
    c.write_raw(b"BITS_POST / HTTP/1.1\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 400, "no Host: {r:?}");
    let mut c = s.connect();
    c.write_raw(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(
        c.read_response(false).unwrap().status,
        400,
        "GET without Host"
    );
    let r = s.send(
        &Request::bits("Ping", "/")
            .header("Host", "a")
            .header("Host", "b"),
    );
    assert_eq!(r.status, 400, "two Host headers: {r:?}");
    let mut c = s.connect();
    c.write_raw(b"BITS_POST / HTTP/1.0\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    assert_eq!(
        c.read_response(false).unwrap().status,
        200,
        "HTTP/1.0 without Host"
    );
}

#[test]
fn a_body_on_bodyless_packets_is_400() {
    let s = Server::start(&[]);
    let r = s.send(&Request::bits("Ping", "/").body(b"x"));
    assert_error(&r, 400, Some(E_INVALIDARG), "Ping with a body");
    let r = s.send(&create_request("/a.bin").body(b"xyz"));
    assert_error(&r, 400, Some(E_INVALIDARG), "Create-Session with a body");
    let id = s.create_session("/a.bin");
    for p in ["Close-Session", "Cancel-Session"] {
        let r = s.send(
            &Request::bits(p, "/a.bin")
                .header("BITS-Session-Id", &id)
                .body(b"hello"),
        );
        assert_error(&r, 400, Some(E_INVALIDARG), &format!("{p} with a body"));
    }
    // The session is untouched by the refused packets.
    let r = s.fragment(&id, "/a.bin", 0, b"ok", 2);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.close(&id, "/a.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("a.bin")).unwrap(), b"ok");
}

#[test]
fn header_value_over_4096_bytes_is_400() {
    let s = Server::start(&[]);
    let r = s.send(&Request::bits("Ping", "/").header("X-Pad", &"a".repeat(4096)));
    assert_eq!(r.status, 200, "a 4096-byte header value is allowed: {r:?}");
    let r = s.send(&Request::bits("Ping", "/").header("X-Pad", &"a".repeat(4097)));
    assert_error(&r, 400, Some(E_INVALIDARG), "4097-byte header value");
    let r = s.send(&create_request("/a.bin").header("Content-Name", &"b".repeat(5000)));
    assert_error(&r, 400, Some(E_INVALIDARG), "5000-byte Content-Name");
}

#[test]
fn content_name_with_forbidden_character_is_400() {
    let s = Server::start(&[]);
    for name in [
        "a:b", "a*b", "a?b", "a\"b", "a<b", "a>b", "a|b", "a\\b", "a/b",
    ] {
        let r = s.send(&create_request("/a.bin").header("Content-Name", name));
        assert_error(
            &r,
            400,
            Some(E_INVALIDARG),
            &format!("Content-Name {name:?}"),
        );
    }
    let r = s.send(&create_request("/a.bin").header("Content-Name", "report.txt"));
    assert_eq!(r.status, 200, "a plain Content-Name: {r:?}");
}

#[test]
fn content_name_over_260_characters_is_400() {
    let s = Server::start(&[]);
    let r = s.send(&create_request("/a.bin").header("Content-Name", &"n".repeat(260)));
    assert_eq!(r.status, 200, "260 characters are allowed: {r:?}");
    let r = s.send(&create_request("/b.bin").header("Content-Name", &"n".repeat(261)));
    assert_error(&r, 400, Some(E_INVALIDARG), "261-character Content-Name");
    // Also on a Fragment.
    let id = s.create_session("/c.bin");
    let r = s.send(&fragment_request(&id, "/c.bin", 0, b"abc", 3).header("Content-Name", "x:y"));
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Fragment with Content-Name x:y",
    );
}

#[test]
fn post_with_method_override_works_like_bits_post() {
    let s = Server::start(&[]);
    let post = |packet: &str| {
        Request::new("POST", "/ov.bin")
            .header("X-Http-Method-Override", "BITS_POST")
            .header("BITS-Packet-Type", packet)
    };
    let r = s.send(&post("Ping"));
    assert_eq!(r.status, 200, "overridden Ping: {r:?}");
    assert_ack_shape(&r, "overridden Ping");
    let r = s.send(&post("Create-Session").header("BITS-Supported-Protocols", GUID));
    assert_eq!(r.status, 200, "overridden Create-Session: {r:?}");
    let id = r.header("BITS-Session-Id").unwrap().to_string();
    let r = s.send(
        &post("Fragment")
            .header("BITS-Session-Id", &id)
            .header("Content-Range", "bytes 0-4/5")
            .body(b"hello"),
    );
    assert_eq!(r.status, 200, "overridden Fragment: {r:?}");
    assert_eq!(r.received(), Some(5));
    let r = s.send(&post("Close-Session").header("BITS-Session-Id", &id));
    assert_eq!(r.status, 200, "overridden Close-Session: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("ov.bin")).unwrap(), b"hello");
    // A plain POST is not a BITS packet.
    let r = s.send(&Request::new("POST", "/ov2.bin").header("BITS-Packet-Type", "Ping"));
    assert_eq!(r.status, 405, "POST without the override: {r:?}");
}

#[test]
fn get_of_uploaded_file_is_refused_without_allow_downloads() {
    let s = Server::start(&[]);
    s.upload("/dl.bin", b"0123456789", 10);
    let r = s.get("/dl.bin");
    assert_eq!(r.status, 405, "GET without --allow-downloads: {r:?}");
    assert!(!r.body.starts_with(b"0123"), "the file leaked: {r:?}");
}

#[test]
fn get_of_uploaded_file_is_served_with_allow_downloads() {
    let s = Server::start(&["--allow-downloads"]);
    s.upload("/sub/dl.bin", b"0123456789", 4);
    let r = s.get("/sub/dl.bin");
    assert_eq!(r.status, 200, "GET: {r:?}");
    assert_eq!(r.body, b"0123456789");
    let r = s.send(&Request::new("GET", "/sub/dl.bin").header("Range", "bytes=0-3"));
    assert_eq!(r.status, 206, "ranged GET: {r:?}");
    assert_eq!(r.body, b"0123");
    let r = s.get("/missing.bin");
    assert_eq!(r.status, 404, "GET of a missing file: {r:?}");
    let r = s.get("/BITS-Sessions/Requests");
    assert_eq!(r.status, 404, "GET into the session folder: {r:?}");
}

#[test]
fn every_error_is_a_well_formed_ack() {
    let s = Server::start(&["--max-upload-size", "100"]);
    let id = s.create_session("/e.bin");
    let cases: Vec<(Request, u16)> = vec![
        (Request::bits("Bogus", "/e.bin"), 400),
        (Request::new("BITS_POST", "/e.bin"), 400),
        (
            Request::bits("Fragment", "/e.bin")
                .header("BITS-Session-Id", &id)
                .header("Content-Range", "bytes 0-0/1")
                .no_auto_length(),
            400,
        ),
        (
            Request::bits("Create-Session", "/e.bin")
                .header("BITS-Supported-Protocols", OTHER_GUID),
            400,
        ),
        (
            Request::bits("Fragment", "/e.bin")
                .header("Content-Range", "bytes 0-0/1")
                .body(b"x"),
            400,
        ),
        (fragment_request(&id, "/e.bin", 0, b"x", 1000), 500),
        (fragment_request(&id, "/e.bin", 5, b"x", 10), 416),
        (
            fragment_request(
                "{00000000-0000-0000-0000-000000000000}",
                "/e.bin",
                0,
                b"x",
                1,
            ),
            500,
        ),
        (fragment_request("not-a-guid", "/e.bin", 0, b"x", 1), 500),
        (
            Request::bits("Close-Session", "/e.bin").header("BITS-Session-Id", "{junk}"),
            500,
        ),
        (create_request("/../e.bin"), 400),
    ];
    for (req, status) in cases {
        let what = format!("{} {} [{:?}]", req.method, req.target, req.headers);
        let r = s.send(&req);
        assert_error(&r, status, None, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------------

#[test]
fn whole_file_in_one_fragment() {
    let s = Server::start(&[]);
    let data = random_bytes(4892, 2);
    let id = s.create_session("/one.bin");
    let r = s.fragment(&id, "/one.bin", 0, &data, 4892);
    assert_eq!(r.status, 200, "{r:?}");
    assert_ack_shape(&r, "Fragment");
    assert_eq!(r.received(), Some(4892), "{r:?}");
    assert_eq!(
        r.header("BITS-Reply-URL"),
        None,
        "plain upload has no reply URL"
    );
    assert_eq!(s.close(&id, "/one.bin").status, 200);
    assert_eq!(file_sha256(&s.data_dir.join("one.bin")), sha256_hex(&data));
}

#[test]
fn several_fragments_in_order_ack_the_next_offset() {
    let s = Server::start(&[]);
    let data = random_bytes(10_000, 3);
    let id = s.create_session("/many.bin");
    let sizes = [1, 999, 4000, 3000, 2000];
    let mut at = 0usize;
    for n in sizes {
        let r = s.fragment(&id, "/many.bin", at as u64, &data[at..at + n], 10_000);
        at += n;
        assert_eq!(r.status, 200, "fragment ending at {at}: {r:?}");
        assert_eq!(r.received(), Some(at as u64), "fragment ending at {at}");
    }
    assert_eq!(s.close(&id, "/many.bin").status, 200);
    assert_eq!(file_sha256(&s.data_dir.join("many.bin")), sha256_hex(&data));
}

#[test]
fn overlapping_fragment_writes_only_the_new_tail() {
    let s = Server::start(&[]);
    let data = random_bytes(200, 4);
    let id = s.create_session("/ov.bin");
    let r = s.fragment(&id, "/ov.bin", 0, &data[..100], 200);
    assert_eq!(r.received(), Some(100), "{r:?}");
    // 50-149: half already held. The held half is sent with different bytes: if the server
    // rewrote it the final file would differ.
    let mut overlap = data[50..150].to_vec();
    overlap[..50].iter_mut().for_each(|b| *b = !*b);
    let r = s.fragment(&id, "/ov.bin", 50, &overlap, 200);
    assert_eq!(r.status, 200, "overlapping fragment: {r:?}");
    assert_eq!(r.received(), Some(150), "overlap Ack: {r:?}");
    let held = fs::metadata(s.session_dir(&id).join("requestfile.bin"))
        .unwrap()
        .len();
    assert_eq!(
        held, 150,
        "the session file holds exactly the bytes acknowledged"
    );
    let r = s.fragment(&id, "/ov.bin", 150, &data[150..], 200);
    assert_eq!(r.received(), Some(200), "{r:?}");
    assert_eq!(s.close(&id, "/ov.bin").status, 200);
    assert_eq!(
        file_sha256(&s.data_dir.join("ov.bin")),
        sha256_hex(&data),
        "the committed file must equal the original bytes"
    );
}

#[test]
fn retransmitted_fragment_is_acked_and_not_written_twice() {
    let s = Server::start(&[]);
    let data = random_bytes(300, 5);
    let id = s.create_session("/re.bin");
    assert_eq!(
        s.fragment(&id, "/re.bin", 0, &data[..100], 300).received(),
        Some(100)
    );
    assert_eq!(
        s.fragment(&id, "/re.bin", 100, &data[100..200], 300)
            .received(),
        Some(200)
    );
    for (start, end) in [(100, 200), (0, 100), (0, 200), (150, 200)] {
        let r = s.fragment(&id, "/re.bin", start as u64, &data[start..end], 300);
        assert_eq!(r.status, 200, "retransmit {start}-{}: {r:?}", end - 1);
        assert_eq!(
            r.received(),
            Some(200),
            "retransmit {start}-{}: {r:?}",
            end - 1
        );
    }
    let held = fs::metadata(s.session_dir(&id).join("requestfile.bin"))
        .unwrap()
        .len();
    assert_eq!(held, 200, "retransmits must not grow the session file");
    assert_eq!(
        s.fragment(&id, "/re.bin", 200, &data[200..], 300)
            .received(),
        Some(300)
    );
    // The final fragment retransmitted after completion (lost Ack).
    let r = s.fragment(&id, "/re.bin", 200, &data[200..], 300);
    assert_eq!((r.status, r.received()), (200, Some(300)), "{r:?}");
    assert_eq!(s.close(&id, "/re.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("re.bin")).unwrap(), data);
    let m = s.metrics();
    assert!(
        m.lines().any(|l| l == "bitsfarm_received_bytes_total 300"),
        "received bytes counts new bytes only:\n{m}"
    );
}

#[test]
fn fragment_after_a_gap_is_416_with_the_next_offset() {
    let s = Server::start(&[]);
    let data = random_bytes(100, 6);
    let id = s.create_session("/gap.bin");
    let r = s.fragment(&id, "/gap.bin", 10, &data[10..20], 100);
    assert_error(&r, 416, None, "gap at the start");
    assert_eq!(r.received(), Some(0), "{r:?}");
    assert_eq!(
        s.fragment(&id, "/gap.bin", 0, &data[..30], 100).received(),
        Some(30)
    );
    let r = s.fragment(&id, "/gap.bin", 31, &data[31..40], 100);
    assert_error(&r, 416, None, "gap of one byte");
    assert_eq!(r.received(), Some(30), "{r:?}");
    // The client resumes from the offset it was given.
    s.send_fragments(&id, "/gap.bin", &data, 30, 35);
    assert_eq!(s.close(&id, "/gap.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("gap.bin")).unwrap(), data);
}

#[test]
fn changed_total_is_400() {
    let s = Server::start(&[]);
    let data = random_bytes(100, 7);
    let id = s.create_session("/t.bin");
    assert_eq!(
        s.fragment(&id, "/t.bin", 0, &data[..50], 100).received(),
        Some(50)
    );
    let r = s.fragment(&id, "/t.bin", 50, &data[50..], 101);
    assert_error(&r, 400, Some(E_INVALIDARG), "total 100 then 101");
    let r = s.fragment(&id, "/t.bin", 50, &data[50..60], 60);
    assert_error(&r, 400, Some(E_INVALIDARG), "total 100 then 60");
    // Nothing was stored by the refused fragments.
    assert_eq!(
        s.fragment(&id, "/t.bin", 50, &data[50..], 100).received(),
        Some(100)
    );
}

#[test]
fn malformed_content_range_is_400() {
    let s = Server::start(&[]);
    let id = s.create_session("/cr.bin");
    for (range, body) in [
        ("bytes 0-1", &b"ab"[..]),
        ("bytes 5-2/10", b""),
        ("bytes 0-10/10", b"0123456789a"),
        ("0-1/2", b"ab"),
        ("garbage", b"ab"),
        ("bytes 0-1/", b"ab"),
        ("bytes -1/2", b"ab"),
        ("bytes */5", b""),
        ("bytes 0-1/x", b"ab"),
        ("bytes 0-1,2-3/4", b"abcd"),
    ] {
        let r = s.send(
            &Request::bits("Fragment", "/cr.bin")
                .header("BITS-Session-Id", &id)
                .header("Content-Range", range)
                .body(body),
        );
        assert_error(
            &r,
            400,
            Some(E_INVALIDARG),
            &format!("Content-Range {range:?}"),
        );
    }
    let r = s.send(
        &Request::bits("Fragment", "/cr.bin")
            .header("BITS-Session-Id", &id)
            .body(b"ab"),
    );
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Fragment without Content-Range",
    );
    // None of that touched the session.
    assert_eq!(s.fragment(&id, "/cr.bin", 0, b"ab", 2).received(), Some(2));
}

#[test]
fn content_length_not_matching_the_range_is_400() {
    let s = Server::start(&[]);
    let id = s.create_session("/cl.bin");
    // Range says 10 bytes, body has 5.
    let r = s.send(
        &Request::bits("Fragment", "/cl.bin")
            .header("BITS-Session-Id", &id)
            .header("Content-Range", "bytes 0-9/20")
            .body(b"01234"),
    );
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Content-Length 5 for a 10-byte range",
    );
    // Range says 2 bytes, body has 5.
    let r = s.send(
        &Request::bits("Fragment", "/cl.bin")
            .header("BITS-Session-Id", &id)
            .header("Content-Range", "bytes 0-1/20")
            .body(b"01234"),
    );
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Content-Length 5 for a 2-byte range",
    );
    let r = s.fragment(&id, "/cl.bin", 0, b"0123456789", 20);
    assert_eq!(
        r.received(),
        Some(10),
        "nothing was stored by the refused fragments: {r:?}"
    );
}

#[test]
fn total_over_max_upload_size_is_500_too_large() {
    let s = Server::start(&["--max-upload-size", "1000"]);
    let id = s.create_session("/big.bin");
    let r = s.fragment(&id, "/big.bin", 0, &[7u8; 10], 1001);
    assert_error(
        &r,
        500,
        Some(BG_E_TOO_LARGE),
        "total 1001 over a limit of 1000",
    );
    let id = s.create_session("/fits.bin");
    let data = random_bytes(1000, 8);
    s.send_fragments(&id, "/fits.bin", &data, 0, 400);
    assert_eq!(s.close(&id, "/fits.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("fits.bin")).unwrap(), data);
}

#[test]
fn zero_byte_upload_creates_an_empty_file() {
    let s = Server::start(&[]);
    let id = s.create_session("/empty.bin");
    let r = s.send(&empty_fragment_request(&id, "/empty.bin"));
    assert_eq!(r.status, 200, "bytes */0: {r:?}");
    assert_ack_shape(&r, "empty fragment");
    assert_eq!(r.received(), Some(0), "{r:?}");
    // Retransmitted.
    let r = s.send(&empty_fragment_request(&id, "/empty.bin"));
    assert_eq!((r.status, r.received()), (200, Some(0)), "{r:?}");
    assert_eq!(s.close(&id, "/empty.bin").status, 200);
    let meta = fs::metadata(s.data_dir.join("empty.bin")).expect("the empty file exists");
    assert!(meta.is_file() && meta.len() == 0, "{meta:?}");
}

// ---------------------------------------------------------------------------------------------
// Close and Cancel
// ---------------------------------------------------------------------------------------------

#[test]
fn close_commits_below_the_data_folder_creating_parents() {
    let s = Server::start(&[]);
    let data = random_bytes(5000, 9);
    let path = "/deep/er/still%20deeper/f.bin";
    let id = s.create_session(path);
    s.send_fragments(&id, path, &data, 0, 1024);
    assert!(
        outside_sessions(&s).is_empty(),
        "before Close nothing lies outside BITS-Sessions: {:?}",
        outside_sessions(&s)
    );
    let r = s.close(&id, path);
    assert_eq!(r.status, 200, "{r:?}");
    assert_ack_shape(&r, "Close-Session");
    let dest = s.data_dir.join("deep/er/still deeper/f.bin");
    assert_eq!(file_sha256(&dest), sha256_hex(&data));
    let expected: Vec<PathBuf> = [
        "deep",
        "deep/er",
        "deep/er/still deeper",
        "deep/er/still deeper/f.bin",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(
        outside_sessions(&s),
        expected,
        "only the destination (and its parents) appear"
    );
    assert!(
        !s.session_dir(&id).join("requestfile.bin").exists(),
        "the session's copy of the upload is gone after Close"
    );
    let rest = tree(&s.root.path().join("data/BITS-Sessions"), &[]);
    assert!(
        !rest.iter().any(|p| p.ends_with("requestfile.bin")),
        "no upload data left in BITS-Sessions: {rest:?}"
    );
}

#[test]
fn retried_close_is_200() {
    let s = Server::start(&[]);
    let id = s.create_session("/rc.bin");
    assert_eq!(s.fragment(&id, "/rc.bin", 0, b"abc", 3).received(), Some(3));
    assert_eq!(s.close(&id, "/rc.bin").status, 200);
    let r = s.close(&id, "/rc.bin");
    assert_eq!(r.status, 200, "retried Close-Session: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("rc.bin")).unwrap(), b"abc");
}

#[test]
fn close_of_an_incomplete_upload_commits_nothing() {
    let s = Server::start(&[]);
    let id = s.create_session("/part.bin");
    assert_eq!(
        s.fragment(&id, "/part.bin", 0, b"abc", 10).received(),
        Some(3)
    );
    let r = s.close(&id, "/part.bin");
    assert_eq!(r.status, 200, "Close of an incomplete upload: {r:?}");
    assert!(
        !s.data_dir.join("part.bin").exists(),
        "an incomplete upload must not be committed"
    );
    assert!(
        outside_sessions(&s).is_empty(),
        "{:?}",
        outside_sessions(&s)
    );
    // A session closed before any fragment commits nothing either.
    let id = s.create_session("/none.bin");
    assert_eq!(s.close(&id, "/none.bin").status, 200);
    assert!(!s.data_dir.join("none.bin").exists());
}

#[test]
fn cancel_discards_data_and_later_fragments_find_no_session() {
    let s = Server::start(&[]);
    let data = random_bytes(100, 10);
    let id = s.create_session("/cx.bin");
    assert_eq!(
        s.fragment(&id, "/cx.bin", 0, &data[..60], 100).received(),
        Some(60)
    );
    let r = s.cancel(&id, "/cx.bin");
    assert_eq!(r.status, 200, "Cancel-Session: {r:?}");
    assert_ack_shape(&r, "Cancel-Session");
    assert!(
        !s.session_dir(&id).join("requestfile.bin").exists(),
        "cancelled data must be discarded"
    );
    let r = s.fragment(&id, "/cx.bin", 60, &data[60..], 100);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "Fragment after Cancel",
    );
    let r = s.cancel(&id, "/cx.bin");
    assert_eq!(r.status, 200, "retried Cancel-Session: {r:?}");
    assert!(!s.data_dir.join("cx.bin").exists());
    assert!(
        outside_sessions(&s).is_empty(),
        "{:?}",
        outside_sessions(&s)
    );
}

// ---------------------------------------------------------------------------------------------
// Session ids
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_malformed_or_misplaced_session_is_not_found() {
    let s = Server::start(&[]);
    let id = s.create_session("/mine.bin");
    let unknown = "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}";
    for (sid, path, what) in [
        (unknown, "/mine.bin", "unknown id"),
        ("{not-a-guid}", "/mine.bin", "malformed id"),
        (
            "0A1B2C3D-4E5F-6789-ABCD-EF0123456789",
            "/mine.bin",
            "id without braces",
        ),
        (id.as_str(), "/other.bin", "id used at another URL"),
    ] {
        let r = s.fragment(sid, path, 0, b"x", 1);
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Fragment, {what}"),
        );
        let r = s.close(sid, path);
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Close, {what}"),
        );
        let r = s.cancel(sid, path);
        assert_error(
            &r,
            500,
            Some(BG_E_SESSION_NOT_FOUND),
            &format!("Cancel, {what}"),
        );
    }
    // The misplaced packets did not affect the session; lower-case ids name it too.
    let r = s.fragment(&id.to_ascii_lowercase(), "/mine.bin", 0, b"x", 1);
    assert_eq!(r.status, 200, "lower-case id: {r:?}");
    assert_eq!(s.close(&id, "/mine.bin").status, 200);
    assert!(!s.data_dir.join("other.bin").exists());
}

#[test]
fn session_packets_without_session_id_are_400() {
    let s = Server::start(&[]);
    let _ = s.create_session("/a.bin");
    let r = s.send(
        &Request::bits("Fragment", "/a.bin")
            .header("Content-Range", "bytes 0-0/1")
            .body(b"x"),
    );
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "Fragment without BITS-Session-Id",
    );
    for p in ["Close-Session", "Cancel-Session"] {
        let r = s.send(&Request::bits(p, "/a.bin"));
        assert_error(
            &r,
            400,
            Some(E_INVALIDARG),
            &format!("{p} without BITS-Session-Id"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Overwrites
// ---------------------------------------------------------------------------------------------

#[test]
fn existing_destination_without_overwrites_is_403_at_create() {
    let s = Server::start(&[]);
    fs::write(s.data_dir.join("exists.bin"), b"original").unwrap();
    let r = s.send(&create_request("/exists.bin"));
    assert_error(
        &r,
        403,
        Some(E_ACCESSDENIED),
        "Create-Session over an existing file",
    );
    assert_eq!(
        fs::read(s.data_dir.join("exists.bin")).unwrap(),
        b"original"
    );
}

#[test]
fn allow_overwrites_replaces_the_file() {
    let s = Server::start(&["--allow-overwrites"]);
    fs::write(s.data_dir.join("rep.bin"), b"original contents").unwrap();
    s.upload("/rep.bin", b"new", 3);
    assert_eq!(fs::read(s.data_dir.join("rep.bin")).unwrap(), b"new");
    s.upload("/rep.bin", b"newer still", 4);
    assert_eq!(
        fs::read(s.data_dir.join("rep.bin")).unwrap(),
        b"newer still"
    );
}

#[test]
fn second_upload_closing_after_the_first_committed_is_403() {
    let s = Server::start(&[]);
    let a = s.create_session("/race.bin");
    let b = s.create_session("/race.bin");
    assert_eq!(
        s.fragment(&a, "/race.bin", 0, b"first", 5).received(),
        Some(5)
    );
    assert_eq!(
        s.fragment(&b, "/race.bin", 0, b"second", 6).received(),
        Some(6)
    );
    assert_eq!(s.close(&a, "/race.bin").status, 200);
    let r = s.close(&b, "/race.bin");
    assert_error(&r, 403, Some(E_ACCESSDENIED), "Close of the second upload");
    assert_eq!(
        fs::read(s.data_dir.join("race.bin")).unwrap(),
        b"first",
        "first file intact"
    );
    // A retried Close does not sneak it in either.
    let r = s.close(&b, "/race.bin");
    assert_eq!(r.status, 403, "retried Close of the second upload: {r:?}");
    assert_eq!(fs::read(s.data_dir.join("race.bin")).unwrap(), b"first");
}

// ---------------------------------------------------------------------------------------------
// URL paths
// ---------------------------------------------------------------------------------------------

#[test]
fn paths_escaping_the_data_folder_are_400() {
    let s = Server::start_nested(&["l1", "l2"], &[]);
    let bad = [
        "/../x",
        "/../../x",
        "/a/../../x",
        "/a/%2e%2e/%2e%2e/x",
        "/%2E%2E/x",
        "/a%2fb",
        "/a%2F..%2F..%2Fx",
        "/a%5cb",
        "/..%5c..%5cx",
        "/a%00b",
        "/BITS-Sessions/x",
        "/bits-sessions/x",
        "/BITS-Sessions/Requests/x",
        "/dir/",
        "//x",
        "/a//b",
        "/./x",
        "/",
    ];
    let fake = "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}";
    for path in bad {
        let r = s.send(&create_request(path));
        assert_error(
            &r,
            400,
            Some(E_INVALIDARG),
            &format!("Create-Session at {path:?}"),
        );
        let r = s.send(&fragment_request(fake, path, 0, b"pwned", 5));
        assert_eq!(r.status, 400, "Fragment at {path:?}: {r:?}");
        let r = s.send(&Request::bits("Close-Session", path).header("BITS-Session-Id", fake));
        assert_eq!(r.status, 400, "Close-Session at {path:?}: {r:?}");
    }
    let everything = tree(s.root.path(), &[]);
    let data_rel = PathBuf::from("l1/l2/data");
    for p in &everything {
        assert!(
            p.starts_with(&data_rel) || data_rel.starts_with(p),
            "{} was created outside the data folder",
            p.display()
        );
    }
    assert!(
        outside_sessions(&s).is_empty(),
        "{:?}",
        outside_sessions(&s)
    );
    let sessions = tree(&s.data_dir.join("BITS-Sessions/Requests"), &[]);
    assert!(sessions.is_empty(), "no session was created: {sessions:?}");
}

#[test]
fn upload_path_prefix_routes_uploads() {
    let s = Server::start(&["--upload-path", "/upload"]);
    s.upload("/upload/a.bin", b"routed", 3);
    assert_eq!(fs::read(s.data_dir.join("a.bin")).unwrap(), b"routed");
    s.upload("/upload/sub/b.bin", b"nested", 6);
    assert_eq!(fs::read(s.data_dir.join("sub/b.bin")).unwrap(), b"nested");
    for path in ["/other/a.bin", "/uploads/a.bin", "/a.bin"] {
        let r = s.send(&create_request(path));
        assert_eq!(r.status, 404, "Create-Session at {path}: {r:?}");
        assert_ack_shape(&r, path);
    }
    let r = s.send(&create_request("/upload/BITS-Sessions/x"));
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "session folder below the prefix",
    );
    // Ping answers anywhere.
    assert_eq!(s.send(&Request::bits("Ping", "/other/x")).status, 200);
}

#[test]
fn config_directories_route_to_their_own_folders_and_limits() {
    let yaml = "\
directories:
  - upload-path: /small
    data-dir: {root}/small
    max-upload-size: 10
  - upload-path: /big
    data-dir: {root}/big
    max-upload-size: 1000
    allow-overwrites: true
";
    let s = Server::start_with_config(yaml, &[]);
    let root = s.root.path().to_path_buf();
    let small = root.join("small");
    let big = root.join("big");
    let upload = |path: &str, data: &[u8]| -> Response {
        let id = s.create_session(path);
        let r = s.fragment(&id, path, 0, data, data.len() as u64);
        if r.status == 200 {
            assert_eq!(s.close(&id, path).status, 200);
        }
        r
    };
    assert_eq!(upload("/small/a.bin", &[1u8; 10]).status, 200);
    let r = upload("/small/b.bin", &[1u8; 11]);
    assert_error(
        &r,
        500,
        Some(BG_E_TOO_LARGE),
        "11 bytes into /small (limit 10)",
    );
    assert_eq!(upload("/big/b.bin", &[2u8; 500]).status, 200);
    let r = upload("/big/c.bin", &[2u8; 1001]);
    assert_error(
        &r,
        500,
        Some(BG_E_TOO_LARGE),
        "1001 bytes into /big (limit 1000)",
    );
    assert_eq!(fs::read(small.join("a.bin")).unwrap(), [1u8; 10]);
    assert_eq!(fs::read(big.join("b.bin")).unwrap(), [2u8; 500]);
    assert!(!small.join("b.bin").exists() && !big.join("a.bin").exists());
    assert!(!big.join("c.bin").exists());
    assert!(small.join("BITS-Sessions").is_dir() && big.join("BITS-Sessions").is_dir());
    // Per-directory overwrite settings: /big allows them, /small does not.
    assert_eq!(upload("/big/b.bin", &[3u8; 5]).status, 200);
    assert_eq!(fs::read(big.join("b.bin")).unwrap(), [3u8; 5]);
    let r = s.send(&create_request("/small/a.bin"));
    assert_error(&r, 403, Some(E_ACCESSDENIED), "overwrite in /small");
    let r = s.send(&create_request("/elsewhere/a.bin"));
    assert_eq!(r.status, 404, "no directory at /elsewhere: {r:?}");
    // A session from one directory is unknown in the other.
    let id = s.create_session("/small/x.bin");
    let r = s.fragment(&id, "/big/x.bin", 0, b"x", 1);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "session of /small used in /big",
    );
}

// ---------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------

#[test]
fn expired_session_is_swept_and_then_unknown() {
    let s = Server::start(&["--session-timeout", "1", "--cleanup-interval", "1"]);
    let id = s.create_session("/exp.bin");
    assert_eq!(
        s.fragment(&id, "/exp.bin", 0, b"abc", 10).received(),
        Some(3)
    );
    let dir = s.session_dir(&id);
    assert!(dir.is_dir(), "session folder {} exists", dir.display());
    thread::sleep(Duration::from_millis(2500));
    assert!(
        wait_until(Duration::from_secs(5), || !dir.exists()),
        "the cleanup sweep did not remove {}",
        dir.display()
    );
    let r = s.fragment(&id, "/exp.bin", 3, b"def", 10);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "Fragment after expiry",
    );
    let m = s.metrics();
    assert!(
        m.contains("bitsfarm_sessions_active 0"),
        "no session active:\n{m}"
    );
}

#[test]
fn expiry_is_checked_when_a_packet_arrives() {
    let s = Server::start(&["--session-timeout", "1", "--cleanup-interval", "3600"]);
    let id = s.create_session("/exp.bin");
    assert_eq!(
        s.fragment(&id, "/exp.bin", 0, b"abc", 10).received(),
        Some(3)
    );
    thread::sleep(Duration::from_millis(2000));
    assert!(s.session_dir(&id).is_dir(), "no sweep has run yet");
    let r = s.fragment(&id, "/exp.bin", 3, b"def", 10);
    assert_error(
        &r,
        500,
        Some(BG_E_SESSION_NOT_FOUND),
        "Fragment after expiry",
    );
    assert!(
        !s.session_dir(&id).exists(),
        "the expired session's folder is removed"
    );
    let r = s.close(&id, "/exp.bin");
    assert_error(&r, 500, Some(BG_E_SESSION_NOT_FOUND), "Close after expiry");
    assert!(!s.data_dir.join("exp.bin").exists());
}

#[test]
fn stalled_client_is_disconnected_and_the_session_survives() {
    let s = Server::start(&["--read-timeout", "1"]);
    let id = s.create_session("/stall.bin");
    let data = random_bytes(1000, 11);
    let mut c = s.connect();
    c.write_partial(&fragment_request(&id, "/stall.bin", 0, &data, 1000), 10)
        .expect("sending the start of a fragment");
    let started = Instant::now();
    let mut seen = Vec::new();
    let closed = c.wait_closed(Duration::from_secs(6), &mut seen);
    assert!(
        closed,
        "the server kept a stalled connection open for {:?} (read timeout 1 s); got {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&seen)
    );
    // The session is usable, and nothing of the stalled fragment was kept.
    let r = s.fragment(&id, "/stall.bin", 0, &data, 1000);
    assert_eq!(r.status, 200, "fragment after the stall: {r:?}");
    assert_eq!(r.received(), Some(1000), "{r:?}");
    assert_eq!(s.close(&id, "/stall.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("stall.bin")).unwrap(), data);
}

#[test]
/// Pauses shorter than `--read-timeout`, at an average (5 KiB/s) above the minimum body rate.
fn slow_but_steady_client_is_not_cut_off() {
    let s = Server::start(&["--read-timeout", "1"]);
    let id = s.create_session("/slow.bin");
    let data = random_bytes(8192, 12);
    let req = fragment_request(&id, "/slow.bin", 0, &data, 8192);
    let mut c = s.connect();
    let mut head = req.head_bytes(s.addr);
    head.extend_from_slice(&data[..2048]);
    c.write_raw(&head).unwrap();
    for part in data[2048..].chunks(2048) {
        thread::sleep(Duration::from_millis(400));
        c.write_raw(part).unwrap();
    }
    let r = c.read_response(false).expect("Ack after a slow body");
    assert_eq!((r.status, r.received()), (200, Some(8192)), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Health and metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn health_readiness_and_metrics() {
    let s = Server::start(&[]);
    let r = s.get("/healthz");
    assert_eq!(r.status, 200, "/healthz: {r:?}");
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "/readyz: {r:?}");
    s.upload("/m.bin", &random_bytes(1234, 13), 1000);
    let r = s.fragment(
        "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}",
        "/m.bin",
        0,
        b"x",
        1,
    );
    assert_eq!(r.status, 500);
    let m = s.metrics();
    assert!(
        m.lines().any(|l| l == "bitsfarm_received_bytes_total 1234"),
        "received bytes:\n{m}"
    );
    assert!(
        m.lines().any(|l| l == "bitsfarm_sessions_created_total 1"),
        "sessions created:\n{m}"
    );
    assert!(
        m.lines().any(|l| l == "bitsfarm_sessions_active 0"),
        "sessions active:\n{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("bitsfarm_errors_total{")
            && l.contains("code=\"0x8020001F\"")
            && l.ends_with(" 1")),
        "errors by code:\n{m}"
    );
    let _open = s.create_session("/n.bin");
    let m = s.metrics();
    assert!(
        m.lines().any(|l| l == "bitsfarm_sessions_active 1"),
        "one open session:\n{m}"
    );
}

#[test]
fn admin_listener_serves_metrics_apart() {
    let s = Server::start(&["--admin-listen", "127.0.0.1:0"]);
    let admin = s
        .admin_addr
        .expect("the listen line names an admin address");
    assert_ne!(admin, s.addr);
    assert_eq!(
        s.first_line,
        format!(
            "bitsfarm: listening on http://{} admin http://{admin}",
            s.addr
        )
    );
    let mut c = s.connect_admin();
    let r = c.send(&Request::new("GET", "/metrics")).unwrap();
    assert_eq!(r.status, 200, "/metrics on the admin listener: {r:?}");
    assert!(
        r.text().contains("bitsfarm_sessions_created_total"),
        "{r:?}"
    );
    let r = c.send(&Request::new("GET", "/healthz")).unwrap();
    assert_eq!(r.status, 200, "/healthz on the admin listener: {r:?}");
    // The admin listener takes no uploads.
    let r = c.send(&create_request("/a.bin")).unwrap();
    assert_eq!(r.status, 404, "BITS_POST on the admin listener: {r:?}");
    // The main listener still takes uploads and no longer serves metrics.
    let id = s.create_session("/a.bin");
    assert!(is_session_id(&id));
    let r = s.get("/metrics");
    assert_ne!(
        r.status, 200,
        "metrics are only on the admin listener: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// More edges: connections, limits, shutdown
// ---------------------------------------------------------------------------------------------

#[test]
fn refused_packets_with_bodies_keep_the_connection_usable() {
    let s = Server::start(&[]);
    let id = s.create_session("/k.bin");
    let data = random_bytes(5000, 14);
    let mut c = s.connect();
    let unknown = "{0A1B2C3D-4E5F-6789-ABCD-EF0123456789}";
    let refused = [
        (fragment_request(unknown, "/k.bin", 0, &data, 5000), 500),
        (
            fragment_request(&id, "/k.bin", 100, &data[100..], 5000),
            416,
        ),
        (Request::bits("Ping", "/").body(&data), 400),
        (
            fragment_request(&id, "/k.bin", 0, &data, 5000).header("Content-Encoding", "gzip"),
            400,
        ),
    ];
    for (i, (req, status)) in refused.iter().enumerate() {
        let r = c
            .send(req)
            .unwrap_or_else(|e| panic!("refused packet {i} on a kept connection: {e}"));
        assert_eq!(r.status, *status, "refused packet {i}: {r:?}");
        assert_eq!(
            r.header("Connection"),
            None,
            "refused packet {i} closed the connection: {r:?}"
        );
    }
    let r = c
        .send(&fragment_request(&id, "/k.bin", 0, &data, 5000))
        .expect("a good fragment after the refusals");
    assert_eq!((r.status, r.received()), (200, Some(5000)), "{r:?}");
    let r = c
        .send(&Request::bits("Close-Session", "/k.bin").header("BITS-Session-Id", &id))
        .expect("Close-Session");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        fs::read(s.data_dir.join("k.bin")).unwrap(),
        data,
        "no refused body leaked into the file"
    );
}

#[test]
fn content_encoding_other_than_identity_is_400() {
    let s = Server::start(&[]);
    let id = s.create_session("/enc.bin");
    let r =
        s.send(&fragment_request(&id, "/enc.bin", 0, b"abc", 3).header("Content-Encoding", "gzip"));
    assert_error(&r, 400, Some(E_INVALIDARG), "Content-Encoding: gzip");
    let r = s.send(
        &fragment_request(&id, "/enc.bin", 0, b"abc", 3).header("Content-Encoding", "identity"),
    );
    assert_eq!(
        (r.status, r.received()),
        (200, Some(3)),
        "Content-Encoding: identity: {r:?}"
    );
}

#[test]
fn supported_protocol_list_is_limited_to_100_guids() {
    let s = Server::start(&[]);
    let mut list = vec![OTHER_GUID; 99];
    list.push(GUID);
    let r = s.send(
        &Request::bits("Create-Session", "/p.bin")
            .header("BITS-Supported-Protocols", &list.join(" ")),
    );
    assert_eq!(r.status, 200, "100 GUIDs: {r:?}");
    list.insert(0, OTHER_GUID);
    let r = s.send(
        &Request::bits("Create-Session", "/p.bin")
            .header("BITS-Supported-Protocols", &list.join(" ")),
    );
    assert_error(&r, 400, Some(E_INVALIDARG), "101 GUIDs");
    let r =
        s.send(&Request::bits("Create-Session", "/p.bin").header("BITS-Supported-Protocols", ""));
    assert_error(&r, 400, Some(E_INVALIDARG), "an empty protocol list");
}

#[test]
fn over_long_names_and_folder_destinations_are_400() {
    let s = Server::start(&[]);
    let r = s.send(&create_request(&format!("/{}", "a".repeat(256))));
    assert_error(&r, 400, Some(E_INVALIDARG), "a 256-byte file name");
    let r = s.send(&create_request(&format!("/{}", "a".repeat(255))));
    assert_eq!(r.status, 200, "a 255-byte file name: {r:?}");
    fs::create_dir(s.data_dir.join("folder")).unwrap();
    let r = s.send(&create_request("/folder"));
    assert_error(
        &r,
        400,
        Some(E_INVALIDARG),
        "a destination that is a folder",
    );
}

#[test]
fn stalled_headers_are_cut_off() {
    let s = Server::start(&["--read-timeout", "1"]);
    let mut c = s.connect();
    c.write_raw(b"BITS_POST /a.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Ping\r\n")
        .unwrap();
    let mut seen = Vec::new();
    assert!(
        c.wait_closed(Duration::from_secs(6), &mut seen),
        "half-sent headers held the connection open; got {:?}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(s.ping().status, 200, "the server still answers others");
}

#[test]
fn stalled_large_fragment_is_rolled_back() {
    let s = Server::start(&["--read-timeout", "1"]);
    let id = s.create_session("/stall2.bin");
    let data = random_bytes(3 << 20, 15);
    assert_eq!(
        s.fragment(&id, "/stall2.bin", 0, &data[..1000], data.len() as u64)
            .received(),
        Some(1000)
    );
    let mut c = s.connect();
    // 1.5 MiB of a 3 MiB fragment: enough for some of it to reach the session file.
    c.write_partial(
        &fragment_request(&id, "/stall2.bin", 1000, &data[1000..], data.len() as u64),
        3 << 19,
    )
    .expect("sending most of a fragment");
    let mut seen = Vec::new();
    assert!(
        c.wait_closed(Duration::from_secs(8), &mut seen),
        "the stalled connection stayed open"
    );
    let held = fs::metadata(s.session_dir(&id).join("requestfile.bin"))
        .unwrap()
        .len();
    assert_eq!(
        held, 1000,
        "a stalled fragment must leave only acknowledged bytes"
    );
    let r = s.fragment(
        &id,
        "/stall2.bin",
        2000,
        &data[2000..3000],
        data.len() as u64,
    );
    assert_eq!((r.status, r.received()), (416, Some(1000)), "{r:?}");
    s.send_fragments(&id, "/stall2.bin", &data, 1000, 1 << 20);
    assert_eq!(s.close(&id, "/stall2.bin").status, 200);
    assert_eq!(
        file_sha256(&s.data_dir.join("stall2.bin")),
        sha256_hex(&data)
    );
}

#[test]
fn client_disconnect_mid_fragment_keeps_only_acked_bytes() {
    let s = Server::start(&[]);
    let id = s.create_session("/drop.bin");
    let data = random_bytes(3 << 20, 16);
    let total = data.len() as u64;
    assert_eq!(
        s.fragment(&id, "/drop.bin", 0, &data[..4096], total)
            .received(),
        Some(4096)
    );
    {
        let mut c = s.connect();
        c.write_partial(
            &fragment_request(&id, "/drop.bin", 4096, &data[4096..], total),
            2 << 20,
        )
        .expect("sending part of a fragment");
        thread::sleep(Duration::from_millis(300));
    } // The connection drops here.
    // The next packet waits for the aborted one to be rolled back.
    let r = s.fragment(&id, "/drop.bin", 8192, &data[8192..9000], total);
    assert_error(&r, 416, None, "gap after an aborted fragment");
    assert_eq!(
        r.received(),
        Some(4096),
        "the aborted fragment's bytes are not acknowledged: {r:?}"
    );
    s.send_fragments(&id, "/drop.bin", &data, 4096, 1 << 20);
    assert_eq!(s.close(&id, "/drop.bin").status, 200);
    assert_eq!(file_sha256(&s.data_dir.join("drop.bin")), sha256_hex(&data));
}

#[test]
fn sigterm_lets_the_packet_in_flight_finish_then_exits() {
    let mut s = Server::start(&[]);
    let id = s.create_session("/term.bin");
    let data = random_bytes(2000, 17);
    let req = fragment_request(&id, "/term.bin", 0, &data, 2000);
    let mut c = s.connect();
    c.write_partial(&req, 1000).unwrap();
    thread::sleep(Duration::from_millis(200));
    s.terminate();
    thread::sleep(Duration::from_millis(200));
    c.write_raw(&data[1000..]).unwrap();
    let r = c
        .read_response(false)
        .expect("the Ack of the packet in flight");
    assert_eq!(
        (r.status, r.received()),
        (200, Some(2000)),
        "packet in flight at SIGTERM: {r:?}"
    );
    let status = s
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        std::net::TcpStream::connect_timeout(&s.addr, Duration::from_secs(2)).is_err(),
        "the listener is closed"
    );
    // The acknowledged bytes are durable: a restarted server completes the upload.
    s.restart();
    assert_eq!(s.close(&id, "/term.bin").status, 200);
    assert_eq!(fs::read(s.data_dir.join("term.bin")).unwrap(), data);
}

/// Two upload directories whose data folders nest (`/` in `data`, `/b` in `data/bfiles`): the outer
/// directory must not reach the inner one's `BITS-Sessions`. Either the configuration is refused
/// at start, or such an upload is refused.
#[test]
fn nested_data_dirs_cannot_reach_each_others_session_state() {
    let yaml = "\
directories:
  - upload-path: /
    data-dir: {root}/data
  - upload-path: /b
    data-dir: {root}/data/bfiles
";
    let Ok(mut s) = Server::try_start_with_config(yaml, &[]) else {
        return; // Refusing the configuration is a correct answer.
    };
    let inner = s.root.path().join("data/bfiles");
    // A client of /b starts an upload.
    let victim = s.create_session("/b/victim.bin");
    // Another client, through /, writes into that session's folder.
    let planted = format!("/bfiles/BITS-Sessions/Requests/{victim}/requestfile.bin");
    let r = s.send(&create_request(&planted));
    let reached = r.status == 200;
    if reached {
        let id = r.header("BITS-Session-Id").unwrap().to_string();
        assert_eq!(s.fragment(&id, &planted, 0, b"EVIL!", 5).status, 200);
        assert_eq!(s.close(&id, &planted).status, 200);
        // After a restart the victim's upload starts from the planted bytes.
        s.restart();
        let r = s.fragment(&victim, "/b/victim.bin", 0, b"0123456789", 10);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(s.close(&victim, "/b/victim.bin").status, 200);
        let got = fs::read(inner.join("victim.bin")).unwrap_or_default();
        panic!(
            "Create-Session at {planted} through / was accepted; after a restart /b/victim.bin \
             committed as {:?} instead of \"0123456789\"",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(
        r.status, 400,
        "write into another directory's session folder: {r:?}"
    );
}

/// More fragment bodies at once than the server holds in memory (8 MiB across all uploads): the
/// ones past it wait their turn, none is refused, and every upload lands whole.
#[test]
fn many_large_fragments_at_once_all_land_whole() {
    many_large_fragments_land_whole(&[]);
}

/// With the least budget there is (one read buffer for every body together), bodies that each
/// hold a part of it and wait for more must still all get through.
#[test]
fn many_large_fragments_land_whole_through_the_least_body_memory() {
    many_large_fragments_land_whole(&["--max-body-memory", "65536"]);
}

/// 24 uploads of 2 MiB at once, one fragment each, against the default 8 MiB budget for bodies
/// held in memory (or the one `extra` sets): every file lands whole.
fn many_large_fragments_land_whole(extra: &[&str]) {
    let s = Server::start(&[&["--max-connections-per-address", "0"], extra].concat());
    let uploads = 24;
    let body = |i: usize| -> Vec<u8> {
        (0..(2 << 20))
            .map(|k: usize| (k.wrapping_mul(31) ^ i) as u8)
            .collect()
    };
    std::thread::scope(|scope| {
        for i in 0..uploads {
            let s = &s;
            scope.spawn(move || {
                let path = format!("/many/{i}.bin");
                let id = s.create_session(&path);
                let data = body(i);
                let r = s.fragment(&id, &path, 0, &data, data.len() as u64);
                assert_eq!(r.status, 200, "upload {i}: {r:?}");
                assert_eq!(s.close(&id, &path).status, 200, "upload {i}");
            });
        }
    });
    for i in 0..uploads {
        let landed = fs::read(s.data_dir.join(format!("many/{i}.bin"))).unwrap();
        assert!(landed == body(i), "upload {i} landed changed");
    }
}
