//! URL-to-path mapping, with the containment oracle: an accepted destination is relative, made of
//! plain names only, never starts with BITS-Sessions, and joined to a data folder stays inside it.
//! Then the Create-Session length check (`check_fits`) on it below data folders of several depths
//! and file systems of several name limits: it accepts exactly what one system call can name.
#![no_main]

use std::path::{Component, Path};

use bitsfarm_fuzz::bits::paths::{
    MAX_FULL_PATH_BYTES, SESSION_DIR, check_fits, destination_path, is_contained,
};
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
    // The full path must fit one system call, and every name the file system's limit.
    let longest = p
        .components()
        .map(|c| c.as_os_str().len())
        .max()
        .unwrap_or(0);
    for root_len in [1usize, 9, 200, 3000, 4000] {
        let root = std::path::PathBuf::from(format!("/{}", "r".repeat(root_len - 1)));
        // The root, a slash (unless the root is `/` itself), the destination.
        let full = root_len + usize::from(root_len > 1) + p.as_os_str().len();
        for name_max in [143usize, 255] {
            let fits = full <= MAX_FULL_PATH_BYTES && longest <= name_max;
            match check_fits(&root, &p, name_max) {
                Ok(()) => assert!(
                    fits,
                    "{s:?} below {root_len}: {full} bytes, a name of {longest}"
                ),
                Err(e) => {
                    assert!(!fits, "{s:?} below {root_len}: refused: {e}");
                    assert_eq!(e.status, 400);
                }
            }
        }
    }
});
