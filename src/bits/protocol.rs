//! The BITS upload protocol ([MC-BUP]) as plain types and functions: packet types, header rules,
//! `Content-Range`, protocol negotiation, session ids and error codes. Nothing here touches a socket
//! or a file, so every rule can be tested on its own.

use std::fmt;

/// The one upload protocol ever defined: "BITS 1.5 Upload Protocol" ([MC-BUP] 1.7.1).
pub const BITS_1_5_UPLOAD_PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// The extension method every BITS request uses.
pub const BITS_POST: &str = "BITS_POST";

/// Windows servers refuse header values longer than this ([MC-BUP] <2>).
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Windows limits `Content-Name` to 260 characters ([MC-BUP] <3>).
pub const MAX_CONTENT_NAME_LEN: usize = 260;
/// Windows servers accept at most this many GUIDs in `BITS-Supported-Protocols`.
pub const MAX_SUPPORTED_PROTOCOLS: usize = 100;
/// BITSHostId is limited to 300 characters.
pub const MAX_HOST_ID_LEN: usize = 300;

pub mod header {
    pub const PACKET_TYPE: &str = "bits-packet-type";
    pub const SESSION_ID: &str = "bits-session-id";
    pub const SUPPORTED_PROTOCOLS: &str = "bits-supported-protocols";
    pub const PROTOCOL: &str = "bits-protocol";
    pub const HOST_ID: &str = "bits-host-id";
    pub const HOST_ID_FALLBACK_TIMEOUT: &str = "bits-host-id-fallback-timeout";
    pub const RECEIVED_CONTENT_RANGE: &str = "bits-received-content-range";
    pub const REPLY_URL: &str = "bits-reply-url";
    pub const ERROR_CODE: &str = "bits-error-code";
    /// The spelling [MC-BUP] 2.2.1.2 uses; accepted from peers, never sent.
    pub const ERROR_CODE_SPEC: &str = "bits-error";
    pub const ERROR_CONTEXT: &str = "bits-error-context";
    pub const CONTENT_NAME: &str = "content-name";
    pub const METHOD_OVERRIDE: &str = "x-http-method-override";
}

/// The packets a client sends with `BITS_POST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Ping,
    CreateSession,
    Fragment,
    CloseSession,
    CancelSession,
}

impl PacketType {
    pub const ALL: [PacketType; 5] = [
        PacketType::Ping,
        PacketType::CreateSession,
        PacketType::Fragment,
        PacketType::CloseSession,
        PacketType::CancelSession,
    ];

    /// Windows sends `Create-Session` while [MC-BUP] 2.2.1.2 lists `CREATE-SESSION`: compare without case.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(value))
    }

    /// The mixed-case spelling Windows puts on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PacketType::Ping => "Ping",
            PacketType::CreateSession => "Create-Session",
            PacketType::Fragment => "Fragment",
            PacketType::CloseSession => "Close-Session",
            PacketType::CancelSession => "Cancel-Session",
        }
    }

    /// Only a Fragment carries a body.
    pub fn takes_body(self) -> bool {
        self == PacketType::Fragment
    }

    /// Every packet but Ping and Create-Session names its session.
    pub fn needs_session(self) -> bool {
        !matches!(self, PacketType::Ping | PacketType::CreateSession)
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an error comes from, as the client reports it (`BITS-Error-Context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorContext {
    /// BG_ERROR_CONTEXT_REMOTE_FILE: the BITS server itself.
    RemoteFile = 0x5,
    /// BG_ERROR_CONTEXT_REMOTE_APPLICATION: the server application (backend).
    RemoteApplication = 0x7,
}

/// HRESULTs the server sends ([MC-BUP] 2.2.1.2, bitsmsg.h).
pub mod hresult {
    pub const E_INVALIDARG: u32 = 0x8007_0057;
    pub const E_ACCESSDENIED: u32 = 0x8007_0005;
    pub const BG_E_SESSION_NOT_FOUND: u32 = 0x8020_001F;
    pub const BG_E_TOO_LARGE: u32 = 0x8020_0020;
    /// HRESULT_FROM_WIN32(ERROR_DISK_FULL); see docs/protocol-decisions.md.
    pub const DISK_FULL: u32 = 0x8007_0070;
    /// The value [MC-BUP] 3.3.6 gives for a back-end notification timeout.
    pub const NOTIFICATION_TIMEOUT: u32 = 0x8007_0112;
    /// Generic failure, for errors of the server's own (I/O) that fit no other code.
    pub const E_FAIL: u32 = 0x8000_4005;
    /// BG_E_HTTP_ERROR_401: the client answers the `WWW-Authenticate` challenge.
    pub const BG_E_HTTP_ERROR_401: u32 = 0x8019_0191;
    pub const BG_E_HTTP_ERROR_404: u32 = 0x8019_0194;
    /// BG_E_HTTP_ERROR_503: transient; a Windows client retries later.
    pub const BG_E_HTTP_ERROR_503: u32 = 0x8019_01F7;
}

/// `0x` and eight upper-case hex digits, the form bitsfarm sends.
pub fn format_hresult(code: u32) -> String {
    format!("0x{code:08X}")
}

/// Reads an HRESULT as peers write it: with or without `0x`, any case, or in decimal.
pub fn parse_hresult(value: &str) -> Option<u32> {
    let v = value.trim();
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).ok();
    }
    if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() {
        return v.parse().ok();
    }
    u32::from_str_radix(v, 16).ok()
}

/// An error answer: HTTP status, `BITS-Error-Code`, `BITS-Error-Context`, and a message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code:#010X}: {message}")]
pub struct BitsError {
    pub status: u16,
    pub code: u32,
    pub context: ErrorContext,
    pub message: String,
    /// Set on 416 so the client can jump to the offset the server expects.
    pub received_content_range: Option<u64>,
}

impl BitsError {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        BitsError {
            status,
            code,
            context: ErrorContext::RemoteFile,
            message: message.into(),
            received_content_range: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, hresult::E_INVALIDARG, message)
    }

    pub fn access_denied(message: impl Into<String>) -> Self {
        Self::new(403, hresult::E_ACCESSDENIED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, hresult::BG_E_HTTP_ERROR_404, message)
    }

    pub fn session_not_found() -> Self {
        Self::new(
            500,
            hresult::BG_E_SESSION_NOT_FOUND,
            "no such session (unknown, expired, or created at another URL); start a new session",
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(500, hresult::BG_E_TOO_LARGE, message)
    }

    pub fn disk_full() -> Self {
        Self::new(
            500,
            hresult::DISK_FULL,
            "the server's disk is full; the fragment was not stored, retry later",
        )
    }

    /// The server is draining: it finishes its sessions but takes no new ones. A 5xx is transient
    /// for BITS clients, so they retry (through the shared address, on another member).
    pub fn draining() -> Self {
        Self::new(
            503,
            hresult::BG_E_HTTP_ERROR_503,
            "this server is draining and takes no new sessions; retry",
        )
    }

    /// A packet for a session another farm member holds, when that member was reached but did
    /// not answer: transient, so the client retries (and keeps its session).
    pub fn owner_unreachable(message: impl Into<String>) -> Self {
        Self::new(503, hresult::BG_E_HTTP_ERROR_503, message)
    }

    /// The 401 Ack: the client answers the `WWW-Authenticate` challenge and sends the packet again.
    pub fn authentication_required() -> Self {
        Self::new(401, hresult::BG_E_HTTP_ERROR_401, "authentication required")
    }

    /// Credentials not checked for now (the client's address failed too often, or every
    /// password check is taken): 503, which a Windows client retries later with its job intact.
    pub fn authentication_deferred(message: impl Into<String>) -> Self {
        Self::new(503, hresult::BG_E_HTTP_ERROR_503, message)
    }

    /// A new session refused by a limit: 503, which a Windows client retries later.
    pub fn session_limit(message: impl Into<String>) -> Self {
        Self::new(503, hresult::BG_E_HTTP_ERROR_503, message)
    }

    /// A fragment larger than the server accepts: 413 (the client halves its fragments) with the
    /// spec's BG_E_TOO_LARGE.
    pub fn fragment_too_large(len: u64, max: u64) -> Self {
        Self::new(
            413,
            hresult::BG_E_TOO_LARGE,
            format!("the fragment is {len} bytes; this server accepts at most {max} per fragment"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, hresult::E_FAIL, message)
    }

    /// The fragment starts after the next expected byte: 416 and where to resume.
    pub fn out_of_sync(next_expected: u64) -> Self {
        BitsError {
            received_content_range: Some(next_expected),
            ..Self::new(
                416,
                0,
                format!(
                    "fragment does not start at or before the next expected offset {next_expected}"
                ),
            )
        }
    }

    /// A failure answered by (or while reaching) the server application.
    pub fn application(status: u16, code: u32, message: impl Into<String>) -> Self {
        BitsError {
            context: ErrorContext::RemoteApplication,
            ..Self::new(status, code, message)
        }
    }
}

/// A response to a BITS packet. Every answer, errors included, is an Ack with an empty body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl Ack {
    pub fn ok() -> Self {
        Ack {
            status: 200,
            headers: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl From<BitsError> for Ack {
    fn from(e: BitsError) -> Self {
        let mut ack = Ack {
            status: e.status,
            headers: vec![
                (header::ERROR_CODE, format_hresult(e.code)),
                (header::ERROR_CONTEXT, format!("0x{:X}", e.context as u32)),
            ],
        };
        if let Some(next) = e.received_content_range {
            ack.headers
                .push((header::RECEIVED_CONTENT_RANGE, next.to_string()));
        }
        ack
    }
}

/// Picks our protocol from a client's `BITS-Supported-Protocols` list (spaces or commas between
/// GUIDs, most preferred first), comparing GUIDs without regard to case or braces.
pub fn negotiate_protocol(supported: &str) -> Result<&'static str, BitsError> {
    let offered: Vec<&str> = supported
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Err(BitsError::invalid(
            "BITS-Supported-Protocols is empty; list the protocol GUIDs the client speaks",
        ));
    }
    if offered.len() > MAX_SUPPORTED_PROTOCOLS {
        return Err(BitsError::invalid(format!(
            "BITS-Supported-Protocols lists {} GUIDs; at most {MAX_SUPPORTED_PROTOCOLS} are accepted",
            offered.len()
        )));
    }
    let ours = strip_braces(BITS_1_5_UPLOAD_PROTOCOL);
    if offered
        .iter()
        .any(|g| strip_braces(g).eq_ignore_ascii_case(ours))
    {
        Ok(BITS_1_5_UPLOAD_PROTOCOL)
    } else {
        Err(BitsError::invalid(format!(
            "no protocol in common: this server speaks only {BITS_1_5_UPLOAD_PROTOCOL}"
        )))
    }
}

fn strip_braces(s: &str) -> &str {
    s.strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(s)
}

/// A session id: an upper-case braced GUID, as IIS writes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// A new id from the operating system's cryptographic random source (UUID v4).
    pub fn generate() -> Self {
        Self::from_uuid(uuid::Uuid::new_v4())
    }

    /// Accepts a braced GUID in any case and gives it the canonical upper-case form. Anything else
    /// cannot name a session of ours; since the id also names a folder, the check is strict.
    pub fn parse(value: &str) -> Option<Self> {
        let inner = value.trim().strip_prefix('{')?.strip_suffix('}')?;
        let id = uuid::Uuid::try_parse(inner).ok()?;
        // try_parse also takes the simple and URN forms; only the hyphenated one is a BITS id.
        if inner.len() != 36 {
            return None;
        }
        Some(Self::from_uuid(id))
    }

    /// The canonical braced, upper-case form of a GUID.
    pub fn from_uuid(id: uuid::Uuid) -> Self {
        SessionId(format!("{{{}}}", id.hyphenated()).to_ascii_uppercase())
    }

    /// The GUID's 128 bits (a session id is only ever made from a valid GUID).
    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::try_parse(self.0.trim_start_matches('{').trim_end_matches('}'))
            .unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes a Fragment carries, from `Content-Range: bytes first-last/total`.
/// `start..end` is half-open; a zero-byte upload is `0..0` of `0` (`bytes */0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentRange {
    pub start: u64,
    pub end: u64,
    pub total: u64,
}

impl FragmentRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True when this fragment holds the upload's last byte.
    pub fn is_last(&self) -> bool {
        self.end == self.total
    }

    /// Parses `bytes <first>-<last>/<total>` (RFC 9110 14.4, zero-based, inclusive) and, for an empty
    /// upload, `bytes */0`. Anything else, and any range outside its total, is refused.
    pub fn parse(value: &str) -> Result<Self, BitsError> {
        let bad = |why: &str| {
            BitsError::invalid(format!(
                "Content-Range {value:?} is invalid: {why}; expected \"bytes FIRST-LAST/TOTAL\""
            ))
        };
        let rest = value
            .get(..6)
            .filter(|unit| unit.eq_ignore_ascii_case("bytes "))
            .map(|_| &value[6..])
            .ok_or_else(|| bad("the unit must be \"bytes\""))?;
        let rest = rest.trim_start_matches(' ');
        let (range, total) = rest
            .split_once('/')
            .ok_or_else(|| bad("missing \"/TOTAL\""))?;
        let total = parse_decimal(total).ok_or_else(|| bad("TOTAL is not a whole number"))?;
        if range == "*" {
            return if total == 0 {
                Ok(FragmentRange {
                    start: 0,
                    end: 0,
                    total: 0,
                })
            } else {
                Err(bad("\"*\" is only valid for an empty (zero-byte) upload"))
            };
        }
        let (first, last) = range
            .split_once('-')
            .ok_or_else(|| bad("missing \"FIRST-LAST\""))?;
        let first = parse_decimal(first).ok_or_else(|| bad("FIRST is not a whole number"))?;
        let last = parse_decimal(last).ok_or_else(|| bad("LAST is not a whole number"))?;
        if first > last {
            return Err(bad("FIRST is after LAST"));
        }
        if last >= total {
            return Err(bad("the range ends at or beyond TOTAL"));
        }
        Ok(FragmentRange {
            start: first,
            end: last + 1,
            total,
        })
    }
}

impl fmt::Display for FragmentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            write!(f, "bytes */{}", self.total)
        } else {
            write!(f, "bytes {}-{}/{}", self.start, self.end - 1, self.total)
        }
    }
}

/// A plain decimal without sign, spaces or exponent; at most 19 digits so it always fits a u64
/// and absurd values are refused instead of wrapping.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Checks a `Content-Name` the way Windows servers do.
pub fn validate_content_name(name: &str) -> Result<(), BitsError> {
    if name.chars().count() > MAX_CONTENT_NAME_LEN {
        return Err(BitsError::invalid(format!(
            "Content-Name is longer than {MAX_CONTENT_NAME_LEN} characters"
        )));
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(c, '\\' | '/' | ':' | '*' | '?' | '"' | '<' | '>' | '|') || c.is_control()
    }) {
        return Err(BitsError::invalid(format!(
            "Content-Name contains the forbidden character {c:?}"
        )));
    }
    Ok(())
}

/// Parses `Content-Length` strictly.
pub fn parse_content_length(value: &str) -> Result<u64, BitsError> {
    parse_decimal(value.trim()).ok_or_else(|| {
        BitsError::invalid(format!("Content-Length {value:?} is not a whole number"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packet_types_ignore_case_and_keep_wire_spelling() {
        assert_eq!(
            PacketType::parse("CREATE-SESSION"),
            Some(PacketType::CreateSession)
        );
        assert_eq!(
            PacketType::parse("create-session"),
            Some(PacketType::CreateSession)
        );
        assert_eq!(PacketType::parse("Fragment"), Some(PacketType::Fragment));
        assert_eq!(PacketType::parse("PING"), Some(PacketType::Ping));
        assert_eq!(
            PacketType::parse("close-Session"),
            Some(PacketType::CloseSession)
        );
        assert_eq!(
            PacketType::parse("Cancel-Session"),
            Some(PacketType::CancelSession)
        );
        assert_eq!(PacketType::parse("Create-Sessions"), None);
        assert_eq!(PacketType::parse(""), None);
        assert_eq!(PacketType::CreateSession.to_string(), "Create-Session");
    }

    #[test]
    fn content_range_accepts_the_spec_forms() {
        let r = FragmentRange::parse("bytes 0-4891/4892").unwrap();
        assert_eq!((r.start, r.end, r.total, r.len()), (0, 4892, 4892, 4892));
        assert!(r.is_last());
        let r = FragmentRange::parse("bytes 128-212/1000").unwrap();
        assert_eq!((r.start, r.end), (128, 213));
        assert!(!r.is_last());
        let r = FragmentRange::parse("BYTES 0-0/1").unwrap();
        assert_eq!(r.len(), 1);
        let r = FragmentRange::parse("bytes */0").unwrap();
        assert!(r.is_empty() && r.is_last());
    }

    #[test]
    fn content_range_refuses_everything_else() {
        for bad in [
            "",
            "bytes",
            "bytes ",
            "0-1/2",
            "bits 0-1/2",
            "bytes 0-1",
            "bytes 0-1/",
            "bytes -1/2",
            "bytes 0-/2",
            "bytes 1-0/2",
            "bytes 0-2/2",
            "bytes 0-1/*",
            "bytes */5",
            "bytes +0-1/2",
            "bytes 0-1/2 ",
            "bytes 0 -1/2",
            "bytes 0-1/0x10",
            "bytes 0-1/99999999999999999999",
            "bytes 18446744073709551615-18446744073709551615/18446744073709551615",
            "bytes 0-1,3-4/10",
            "bytes 0-１/2",
        ] {
            assert!(FragmentRange::parse(bad).is_err(), "{bad:?} was accepted");
            assert_eq!(FragmentRange::parse(bad).unwrap_err().status, 400);
        }
    }

    proptest! {
        #[test]
        fn content_range_round_trips(start in 0u64..1<<50, len in 1u64..1<<30, extra in 0u64..1<<30) {
            let r = FragmentRange { start, end: start + len, total: start + len + extra };
            prop_assert_eq!(FragmentRange::parse(&r.to_string()).unwrap(), r);
        }

        #[test]
        fn content_range_parse_never_panics_and_is_consistent(s in "\\PC{0,40}") {
            if let Ok(r) = FragmentRange::parse(&s) {
                prop_assert!(r.start <= r.end && r.end <= r.total);
                prop_assert!(!r.is_empty() || r.total == 0);
            }
        }

        #[test]
        fn content_range_near_misses_are_refused(a in 0u64..1000, b in 0u64..1000, t in 0u64..1000) {
            let parsed = FragmentRange::parse(&format!("bytes {a}-{b}/{t}"));
            prop_assert_eq!(parsed.is_ok(), a <= b && b < t);
        }
    }

    #[test]
    fn negotiation_accepts_spaces_commas_and_any_case() {
        let ours = BITS_1_5_UPLOAD_PROTOCOL;
        for list in [
            ours.to_string(),
            ours.to_uppercase(),
            format!("{{00000000-0000-0000-0000-000000000000}} {ours}"),
            format!(
                "{{00000000-0000-0000-0000-000000000000}},{}",
                ours.to_uppercase()
            ),
            format!(" {ours} , {{11111111-0000-0000-0000-000000000000}} "),
        ] {
            assert_eq!(negotiate_protocol(&list), Ok(ours), "{list}");
        }
    }

    #[test]
    fn negotiation_fails_without_a_common_protocol() {
        assert_eq!(negotiate_protocol("").unwrap_err().status, 400);
        assert_eq!(
            negotiate_protocol("{00000000-0000-0000-0000-000000000000}")
                .unwrap_err()
                .code,
            hresult::E_INVALIDARG
        );
        let many = vec!["{00000000-0000-0000-0000-000000000000}"; 101].join(" ");
        assert!(negotiate_protocol(&many).is_err());
    }

    #[test]
    fn session_ids_are_upper_case_braced_guids() {
        let id = SessionId::generate();
        let s = id.as_str();
        assert_eq!(s.len(), 38);
        assert!(s.starts_with('{') && s.ends_with('}'));
        assert_eq!(s, s.to_ascii_uppercase());
        assert_ne!(SessionId::generate(), id);
        assert_eq!(SessionId::parse(&s.to_ascii_lowercase()), Some(id.clone()));
        for bad in [
            "",
            "{}",
            "A0FF5911-4144-45B3-BF27-27AFC8EC8A67",
            "{A0FF591141444 5B3BF2727AFC8EC8A67}",
            "{A0FF5911414445B3BF2727AFC8EC8A67}",
            "{../../etc/passwd}",
            "{A0FF5911-4144-45B3-BF27-27AFC8EC8A6G}",
        ] {
            assert_eq!(SessionId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn error_acks_carry_code_and_context() {
        let ack = Ack::from(BitsError::session_not_found());
        assert_eq!(ack.status, 500);
        assert_eq!(ack.header("BITS-Error-Code"), Some("0x8020001F"));
        assert_eq!(ack.header("BITS-Error-Context"), Some("0x5"));
        let ack = Ack::from(BitsError::out_of_sync(213));
        assert_eq!(ack.status, 416);
        assert_eq!(ack.header("BITS-Received-Content-Range"), Some("213"));
        assert_eq!(ack.header("BITS-Error-Code"), Some("0x00000000"));
        let ack = Ack::from(BitsError::application(403, 0x8019_0193, "no"));
        assert_eq!(ack.header("BITS-Error-Context"), Some("0x7"));
    }

    #[test]
    fn hresults_format_and_parse() {
        assert_eq!(format_hresult(hresult::BG_E_TOO_LARGE), "0x80200020");
        assert_eq!(format_hresult(0), "0x00000000");
        assert_eq!(parse_hresult("0x8020001f"), Some(0x8020_001F));
        assert_eq!(parse_hresult("8020001F"), Some(0x8020_001F));
        assert_eq!(parse_hresult("0"), Some(0));
        assert_eq!(parse_hresult("zz"), None);
    }

    #[test]
    fn content_names_follow_the_windows_rules() {
        assert!(validate_content_name("rfc2119.txt").is_ok());
        assert!(validate_content_name(&"a".repeat(260)).is_ok());
        assert!(validate_content_name(&"a".repeat(261)).is_err());
        for c in ['\\', '/', ':', '*', '?', '"', '<', '>', '|', '\0', '\n'] {
            assert!(validate_content_name(&format!("a{c}b")).is_err(), "{c:?}");
        }
    }

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_content_length("0"), Ok(0));
        assert_eq!(parse_content_length("4892"), Ok(4892));
        assert!(parse_content_length("-1").is_err());
        assert!(parse_content_length("1e3").is_err());
        assert!(parse_content_length("").is_err());
    }
}
