//! The packet/header parser: the input is a raw HTTP request head (parsed by httparse, as hyper
//! does), its headers go through `parse_packet` exactly as the server's do. Never panics; an
//! accepted packet has a known type, and no body unless it is a Fragment.
#![no_main]

use bitsfarm_fuzz::bits::packet::parse_packet;
use bitsfarm_fuzz::bits::protocol::{PacketType, SessionId, negotiate_protocol};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    if req.parse(data).is_err() {
        return;
    }
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    if let Ok(p) = parse_packet(&headers) {
        assert!(PacketType::ALL.contains(&p.kind));
        assert!(p.kind.takes_body() || p.content_length == 0);
    }
    // The other per-packet header parsers see the same values.
    for v in headers.values() {
        if let Ok(s) = v.to_str() {
            if let Some(id) = SessionId::parse(s) {
                assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
            }
            let _ = negotiate_protocol(s);
        }
    }
});
