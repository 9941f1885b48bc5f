//! The headers every BITS packet shares, checked before any packet logic runs. Pure: no I/O, so
//! it is fuzzed on its own (`fuzz/fuzz_targets/packet_headers.rs`).

use http::{HeaderMap, header as h};

use super::protocol::{
    BitsError, MAX_HEADER_VALUE_LEN, PacketType, header, parse_content_length,
    validate_content_name,
};

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, BitsError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| BitsError::invalid(format!("header {name} is not visible ASCII"))),
    }
}

pub fn required<'a>(
    headers: &'a HeaderMap,
    name: &str,
    packet: PacketType,
) -> Result<&'a str, BitsError> {
    header_str(headers, name)?
        .ok_or_else(|| BitsError::invalid(format!("{packet} requires the {name} header")))
}

/// Headers that may come once at most. Given twice, a proxy in front may read a different copy
/// than this server does (first wins, last wins, or both joined), and then the two disagree on
/// which packet, session, range or user a request is: so a repeat is refused rather than read.
pub const SINGLE_HEADERS: [&str; 4] = [
    header::PACKET_TYPE,
    header::SESSION_ID,
    "content-range",
    "authorization",
];

/// Refuses a request that repeats one of `SINGLE_HEADERS`.
pub fn check_not_repeated(headers: &HeaderMap) -> Result<(), BitsError> {
    match SINGLE_HEADERS
        .iter()
        .find(|name| headers.get_all(**name).iter().nth(1).is_some())
    {
        Some(name) => Err(BitsError::invalid(format!(
            "the {name} header is given more than once; send it once"
        ))),
        None => Ok(()),
    }
}

/// The parts of a BITS request that every packet shares, checked before any packet logic runs.
pub struct Packet<'a> {
    pub kind: PacketType,
    pub headers: &'a HeaderMap,
    pub content_length: u64,
}

pub fn parse_packet(headers: &HeaderMap) -> Result<Packet<'_>, BitsError> {
    if let Some((name, _)) = headers.iter().find(|(_, v)| v.len() > MAX_HEADER_VALUE_LEN) {
        return Err(BitsError::invalid(format!(
            "header {name} is longer than {MAX_HEADER_VALUE_LEN} bytes"
        )));
    }
    check_not_repeated(headers)?;
    let kind = match header_str(headers, header::PACKET_TYPE)? {
        None => {
            return Err(BitsError::invalid(
                "BITS-Packet-Type is missing; every BITS_POST names its packet",
            ));
        }
        Some(v) => PacketType::parse(v)
            .ok_or_else(|| BitsError::invalid(format!("unknown BITS-Packet-Type {v:?}")))?,
    };
    if headers.contains_key(h::TRANSFER_ENCODING) {
        return Err(BitsError::invalid(format!(
            "{kind} must be sent with Content-Length, not Transfer-Encoding"
        )));
    }
    let content_length = match header_str(headers, "content-length")? {
        Some(v) => parse_content_length(v)?,
        // RFC 9112 §6.3: a request with neither Content-Length nor Transfer-Encoding has no
        // body, which is all these packets may have (see protocol-decisions.md).
        None if !kind.takes_body() => 0,
        None => {
            return Err(BitsError::invalid(format!(
                "{kind} requires the Content-Length header"
            )));
        }
    };
    if !kind.takes_body() && content_length != 0 {
        return Err(BitsError::invalid(format!(
            "{kind} takes no body, but Content-Length is {content_length}"
        )));
    }
    if let Some(name) = header_str(headers, header::CONTENT_NAME)? {
        validate_content_name(name)?;
    }
    Ok(Packet {
        kind,
        headers,
        content_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (name, value) in pairs {
            m.append(*name, value.parse().unwrap());
        }
        m
    }

    #[test]
    fn packets_without_a_body_may_leave_out_content_length_and_a_fragment_may_not() {
        for kind in ["Ping", "Create-Session", "Close-Session", "Cancel-Session"] {
            let h = headers(&[(header::PACKET_TYPE, kind)]);
            let p = parse_packet(&h).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(p.content_length, 0, "{kind}");
            let chunked = headers(&[
                (header::PACKET_TYPE, kind),
                ("transfer-encoding", "chunked"),
            ]);
            assert_eq!(parse_packet(&chunked).err().map(|e| e.status), Some(400));
        }
        let e = parse_packet(&headers(&[(header::PACKET_TYPE, "Fragment")]))
            .err()
            .unwrap();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("Content-Length"), "{e}");
        let fragment = headers(&[(header::PACKET_TYPE, "Fragment"), ("content-length", "10")]);
        let p = parse_packet(&fragment).unwrap();
        assert_eq!(p.content_length, 10);
        let body = headers(&[(header::PACKET_TYPE, "Ping"), ("content-length", "1")]);
        assert_eq!(parse_packet(&body).err().map(|e| e.status), Some(400));
    }

    #[test]
    fn a_repeated_packet_type_session_range_or_authorization_is_refused() {
        for name in SINGLE_HEADERS {
            let once = headers(&[(header::PACKET_TYPE, "Ping"), (name, "x")]);
            let twice = headers(&[(header::PACKET_TYPE, "Ping"), (name, "x"), (name, "x")]);
            if name != header::PACKET_TYPE {
                assert!(check_not_repeated(&once).is_ok(), "{name}");
            }
            let e = check_not_repeated(&twice).unwrap_err();
            assert_eq!(e.status, 400, "{name}");
            assert!(e.message.contains(name), "{e}");
            assert_eq!(parse_packet(&twice).err().map(|e| e.status), Some(400));
        }
        // Other headers may repeat.
        let other = headers(&[(header::PACKET_TYPE, "Ping"), ("x-a", "1"), ("x-a", "2")]);
        assert!(parse_packet(&other).is_ok());
    }
}
