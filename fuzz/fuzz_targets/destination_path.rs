//! URL-to-path mapping, with the containment oracle: an accepted destination is relative, made of
//! plain names only, never starts with BITS-Sessions, and joined to a data folder stays inside it.
#![no_main]

use std::path::{Component, Path};

use bitsfarm_fuzz::bits::paths::{SESSION_DIR, destination_path, is_contained};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = destination_path(s) else {
        return;
    };
    assert!(is_contained(&p), "{s:?} -> {p:?}");
    assert!(p.is_relative(), "{s:?} -> {p:?}");
    let mut n = 0;
    for c in p.components() {
        let Component::Normal(name) = c else {
            panic!("{s:?} -> {p:?}: {c:?} is not a plain name");
        };
        let b = name.as_encoded_bytes();
        assert!(!b.is_empty() && b.len() <= 255, "{s:?} -> {p:?}");
        assert!(
            !b.contains(&0) && !b.contains(&b'/') && !b.contains(&b'\\'),
            "{s:?} -> {p:?}"
        );
        assert!(b != b"." && b != b"..", "{s:?} -> {p:?}");
        n += 1;
    }
    assert!(n >= 1, "{s:?} -> empty path");
    let first = p
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .to_ascii_lowercase();
    assert_ne!(first, SESSION_DIR.to_ascii_lowercase(), "{s:?} -> {p:?}");
    // Lexically, the joined path never leaves the root.
    let root = Path::new("/srv/data");
    let mut depth = 0usize;
    for c in root
        .join(&p)
        .strip_prefix(root)
        .expect("below the root")
        .components()
    {
        match c {
            Component::ParentDir => depth = depth.checked_sub(1).expect("escaped the root"),
            _ => depth += 1,
        }
    }
});
