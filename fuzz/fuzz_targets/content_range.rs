//! `Content-Range` parsing: never panics; what it accepts is a consistent range that prints back
//! to a value parsing to the same range.
#![no_main]

use bitsfarm_fuzz::bits::protocol::FragmentRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = FragmentRange::parse(s) {
        assert!(r.start <= r.end, "{s:?} -> {r:?}");
        assert!(r.end <= r.total, "{s:?} -> {r:?}");
        assert!(!r.is_empty() || r.total == 0, "{s:?} -> {r:?}");
        let printed = r.to_string();
        assert_eq!(
            FragmentRange::parse(&printed).ok(),
            Some(r),
            "{s:?} -> {printed:?}"
        );
    }
});
