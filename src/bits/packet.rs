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
    let content_length = parse_content_length(required(headers, "content-length", kind)?)?;
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
