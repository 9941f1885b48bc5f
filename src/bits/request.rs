//! What a request's headers decide before it reaches a session: whether it is a BITS packet,
//! whether it carries a body, which session it names, whether a Fragment's framing is one the
//! server takes, and the answer to a Create-Session. Pure: the server's HTTP front calls these,
//! and they are tested here without a socket.

use http::{HeaderMap, Method, Version, header as h};

use super::packet::{check_not_repeated, header_str, required};
use super::protocol::{
    Ack, BITS_POST, BitsError, FragmentRange, PacketType, SessionId, header, negotiate_protocol,
};

/// `BITS_POST`, or `POST` with `X-Http-Method-Override: BITS_POST` for clients that cannot send
/// extension methods.
pub fn is_bits_post(method: &Method, headers: &HeaderMap) -> bool {
    method.as_str() == BITS_POST
        || (method == Method::POST
            && headers
                .get(header::METHOD_OVERRIDE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(BITS_POST)))
}

/// GET or HEAD: what reads a reply, a completed file, or an admin endpoint.
pub fn is_get_or_head(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Whether a request says it carries a body (a `Content-Length` other than 0, or chunked): an
/// answer that leaves such a body unread must close the connection.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers
        .get(h::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || headers.contains_key(h::TRANSFER_ENCODING)
}

/// What every request must meet before anything reads it: exactly one `Host` in HTTP/1.1
/// (RFC 9112 §3.2: a server must answer 400 otherwise; an HTTP/1.0 request may have none), and
/// no repeat of the headers that pick a packet, session, range or user (`SINGLE_HEADERS`).
pub fn check_headers(version: Version, headers: &HeaderMap) -> Result<(), BitsError> {
    match headers.get_all(h::HOST).iter().count() {
        0 if version == Version::HTTP_11 => {
            return Err(BitsError::invalid(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        0 | 1 => {}
        _ => {
            return Err(BitsError::invalid(
                "the Host header is given more than once; send it once",
            ));
        }
    }
    check_not_repeated(headers)
}

/// The Host the client asked for, when it sent a usable one.
pub fn host(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(h::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// The session a BITS packet names, for packets that belong to one; `None` for the others and
/// for an id that cannot be one of ours.
pub fn named_session(headers: &HeaderMap) -> Option<(SessionId, PacketType)> {
    let kind = headers
        .get(header::PACKET_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(PacketType::parse)?;
    if !kind.needs_session() {
        return None;
    }
    let id = headers.get(header::SESSION_ID)?.to_str().ok()?;
    Some((SessionId::parse(id)?, kind))
}

/// The session a packet that needs one names: missing is invalid, and an id that cannot be one
/// of ours is answered like an unknown session.
pub fn session_id(headers: &HeaderMap, kind: PacketType) -> Result<SessionId, BitsError> {
    let raw = required(headers, header::SESSION_ID, kind)?;
    SessionId::parse(raw).ok_or_else(BitsError::session_not_found)
}

/// A Fragment's `Content-Range`.
pub fn fragment_range(headers: &HeaderMap) -> Result<FragmentRange, BitsError> {
    FragmentRange::parse(required(headers, "content-range", PacketType::Fragment)?)
}

/// Refuses a fragment over the server's `max-fragment-size` (413: the client halves its
/// fragments).
pub fn check_fragment_size(range: &FragmentRange, max: Option<u64>) -> Result<(), BitsError> {
    match max {
        Some(max) if range.len() > max => Err(BitsError::fragment_too_large(range.len(), max)),
        _ => Ok(()),
    }
}

/// A Fragment's body must be the range's bytes as they are: no content coding (the server
/// stores and hashes what it gets), and exactly as long as the range says.
pub fn check_fragment_body(
    headers: &HeaderMap,
    content_length: u64,
    range: &FragmentRange,
) -> Result<(), BitsError> {
    if let Some(enc) = header_str(headers, "content-encoding")?
        && !enc.trim().eq_ignore_ascii_case("identity")
    {
        return Err(BitsError::invalid(format!(
            "Content-Encoding {enc:?} is not supported; send fragments as identity"
        )));
    }
    if content_length != range.len() {
        return Err(BitsError::invalid(format!(
            "Content-Length {content_length} does not match Content-Range {range} ({} bytes)",
            range.len()
        )));
    }
    Ok(())
}

/// What a Create-Session asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct CreateSession<'a> {
    /// The protocol both sides speak (from `BITS-Supported-Protocols`).
    pub protocol: &'static str,
    pub content_name: Option<&'a str>,
}

pub fn create_session(headers: &HeaderMap) -> Result<CreateSession<'_>, BitsError> {
    let supported = required(
        headers,
        header::SUPPORTED_PROTOCOLS,
        PacketType::CreateSession,
    )?;
    Ok(CreateSession {
        protocol: negotiate_protocol(supported)?,
        content_name: header_str(headers, header::CONTENT_NAME)?,
    })
}

/// The Ack to a Create-Session. With a host id, the client keeps to this server for its
/// session, for `fallback_timeout` seconds when that is not 0.
pub fn session_created(
    protocol: &str,
    id: &SessionId,
    host_id: Option<&str>,
    fallback_timeout: u64,
) -> Ack {
    let mut ack = Ack::ok()
        .with(header::PROTOCOL, protocol)
        .with(header::SESSION_ID, id.as_str())
        .with("accept-encoding", "identity");
    if let Some(host_id) = host_id {
        ack = ack.with(header::HOST_ID, host_id);
        if fallback_timeout > 0 {
            ack = ack.with(
                header::HOST_ID_FALLBACK_TIMEOUT,
                fallback_timeout.to_string(),
            );
        }
    }
    ack
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits::protocol::{BITS_1_5_UPLOAD_PROTOCOL, hresult};

    const ID: &str = "{0F0E0D0C-0B0A-4908-8706-050403020100}";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (name, value) in pairs {
            m.append(*name, value.parse().unwrap());
        }
        m
    }

    fn range(value: &str) -> FragmentRange {
        FragmentRange::parse(value).unwrap()
    }

    #[test]
    fn a_bits_post_is_the_extension_method_or_a_post_that_says_it_is_one() {
        let none = HeaderMap::new();
        let over = headers(&[(header::METHOD_OVERRIDE, " bits_post ")]);
        let bits = Method::from_bytes(BITS_POST.as_bytes()).unwrap();
        assert!(is_bits_post(&bits, &none));
        assert!(is_bits_post(&Method::POST, &over));
        assert!(!is_bits_post(&Method::POST, &none));
        assert!(
            !is_bits_post(&Method::PUT, &over),
            "only POST may be overridden"
        );
        let other = headers(&[(header::METHOD_OVERRIDE, "PUT")]);
        assert!(!is_bits_post(&Method::POST, &other));
    }

    #[test]
    fn reads_are_get_and_head() {
        assert!(is_get_or_head(&Method::GET) && is_get_or_head(&Method::HEAD));
        assert!(!is_get_or_head(&Method::POST));
    }

    #[test]
    fn a_body_is_announced_by_a_nonzero_length_or_chunking() {
        assert!(!has_body(&HeaderMap::new()));
        assert!(!has_body(&headers(&[("content-length", "0")])));
        assert!(has_body(&headers(&[("content-length", "12")])));
        assert!(has_body(&headers(&[("transfer-encoding", "chunked")])));
    }

    #[test]
    fn http_1_1_needs_exactly_one_host_and_no_repeated_authorization() {
        let host = headers(&[("host", "farm:8080")]);
        assert_eq!(check_headers(Version::HTTP_11, &host), Ok(()));
        // An empty Host is a Host (RFC 9112 §3.2: the target has no authority).
        assert_eq!(
            check_headers(Version::HTTP_11, &headers(&[("host", "")])),
            Ok(())
        );
        let e = check_headers(Version::HTTP_11, &HeaderMap::new()).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("Host"), "{e}");
        assert_eq!(check_headers(Version::HTTP_10, &HeaderMap::new()), Ok(()));
        let two = headers(&[("host", "a"), ("host", "b")]);
        assert_eq!(
            check_headers(Version::HTTP_10, &two).unwrap_err().status,
            400
        );
        let auth = headers(&[
            ("host", "a"),
            ("authorization", "Basic YTpi"),
            ("authorization", "Basic Yzpk"),
        ]);
        let e = check_headers(Version::HTTP_11, &auth).unwrap_err();
        assert!(e.message.contains("authorization"), "{e}");
    }

    #[test]
    fn an_empty_host_is_no_host() {
        assert_eq!(host(&headers(&[("host", "farm:8080")])), Some("farm:8080"));
        assert_eq!(host(&headers(&[("host", "")])), None);
        assert_eq!(host(&HeaderMap::new()), None);
    }

    #[test]
    fn only_packets_of_a_session_name_one() {
        let lower = ID.to_ascii_lowercase();
        let frag = headers(&[
            (header::PACKET_TYPE, "Fragment"),
            (header::SESSION_ID, &lower),
        ]);
        let (id, kind) = named_session(&frag).unwrap();
        assert_eq!((id.as_str(), kind), (ID, PacketType::Fragment));
        let ping = headers(&[(header::PACKET_TYPE, "Ping"), (header::SESSION_ID, ID)]);
        assert_eq!(named_session(&ping), None);
        let junk = headers(&[
            (header::PACKET_TYPE, "Close-Session"),
            (header::SESSION_ID, "x"),
        ]);
        assert_eq!(named_session(&junk), None);
        assert_eq!(
            named_session(&headers(&[(header::PACKET_TYPE, "Fragment")])),
            None
        );
    }

    #[test]
    fn a_missing_session_id_is_invalid_and_a_foreign_one_is_unknown() {
        let kind = PacketType::CloseSession;
        assert_eq!(
            session_id(&headers(&[(header::SESSION_ID, ID)]), kind)
                .unwrap()
                .as_str(),
            ID
        );
        assert_eq!(session_id(&HeaderMap::new(), kind).unwrap_err().status, 400);
        let e = session_id(&headers(&[(header::SESSION_ID, "../etc")]), kind).unwrap_err();
        assert_eq!(e.code, hresult::BG_E_SESSION_NOT_FOUND);
    }

    #[test]
    fn a_fragment_needs_a_valid_content_range() {
        assert_eq!(
            fragment_range(&headers(&[("content-range", "bytes 0-9/20")])),
            Ok(range("bytes 0-9/20"))
        );
        assert_eq!(fragment_range(&HeaderMap::new()).unwrap_err().status, 400);
        let e = fragment_range(&headers(&[("content-range", "bytes 5-1/20")])).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn a_fragment_over_the_size_limit_is_413() {
        let r = range("bytes 0-99/1000");
        assert_eq!(check_fragment_size(&r, None), Ok(()));
        assert_eq!(check_fragment_size(&r, Some(100)), Ok(()));
        let e = check_fragment_size(&r, Some(99)).unwrap_err();
        assert_eq!((e.status, e.code), (413, hresult::BG_E_TOO_LARGE));
    }

    #[test]
    fn a_fragment_body_is_identity_and_exactly_its_range() {
        let r = range("bytes 10-19/20");
        assert_eq!(check_fragment_body(&HeaderMap::new(), 10, &r), Ok(()));
        let identity = headers(&[("content-encoding", " Identity ")]);
        assert_eq!(check_fragment_body(&identity, 10, &r), Ok(()));
        let gzip = headers(&[("content-encoding", "gzip")]);
        let e = check_fragment_body(&gzip, 10, &r).unwrap_err();
        assert!(e.message.contains("Content-Encoding"), "{e}");
        let e = check_fragment_body(&HeaderMap::new(), 9, &r).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("does not match Content-Range"), "{e}");
        let empty = range("bytes */0");
        assert_eq!(check_fragment_body(&HeaderMap::new(), 0, &empty), Ok(()));
    }

    #[test]
    fn create_session_needs_a_protocol_in_common() {
        let ok = headers(&[
            (header::SUPPORTED_PROTOCOLS, BITS_1_5_UPLOAD_PROTOCOL),
            (header::CONTENT_NAME, "a.bin"),
        ]);
        assert_eq!(
            create_session(&ok),
            Ok(CreateSession {
                protocol: BITS_1_5_UPLOAD_PROTOCOL,
                content_name: Some("a.bin"),
            })
        );
        assert_eq!(create_session(&HeaderMap::new()).unwrap_err().status, 400);
        let unknown = headers(&[(
            header::SUPPORTED_PROTOCOLS,
            "{00000000-0000-0000-0000-000000000000}",
        )]);
        assert!(create_session(&unknown).is_err());
    }

    #[test]
    fn the_created_ack_names_the_host_only_when_there_is_one() {
        let id = SessionId::parse(ID).unwrap();
        let plain = session_created(BITS_1_5_UPLOAD_PROTOCOL, &id, None, 300);
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header(header::SESSION_ID), Some(ID));
        assert_eq!(
            plain.header(header::PROTOCOL),
            Some(BITS_1_5_UPLOAD_PROTOCOL)
        );
        assert_eq!(plain.header("accept-encoding"), Some("identity"));
        assert_eq!(plain.header(header::HOST_ID), None);
        assert_eq!(plain.header(header::HOST_ID_FALLBACK_TIMEOUT), None);
        let hosted = session_created(BITS_1_5_UPLOAD_PROTOCOL, &id, Some("web-1:443"), 300);
        assert_eq!(hosted.header(header::HOST_ID), Some("web-1:443"));
        assert_eq!(hosted.header(header::HOST_ID_FALLBACK_TIMEOUT), Some("300"));
        let forever = session_created(BITS_1_5_UPLOAD_PROTOCOL, &id, Some("web-1:443"), 0);
        assert_eq!(forever.header(header::HOST_ID_FALLBACK_TIMEOUT), None);
    }
}
