//! From a request's URL path to a file under the data folder. This is the one place that decides
//! where client bytes land, so it only ever builds paths out of plain, checked names.

use std::path::{Component, Path, PathBuf};

use percent_encoding::percent_decode_str;

use super::protocol::BitsError;

/// The folder under each data folder that holds session state; no upload may use this name.
pub const SESSION_DIR: &str = "BITS-Sessions";

/// Longest name of one path segment most Linux filesystems allow.
const MAX_SEGMENT_BYTES: usize = 255;
/// Longest destination path, relative to the data folder.
const MAX_PATH_BYTES: usize = 4096;
/// The longest path the kernel takes in one call, in bytes: PATH_MAX (4096) less its closing NUL.
pub const MAX_FULL_PATH_BYTES: usize = 4095;

/// A URL path prefix an upload directory answers at: `/` or `/a/b` (no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadPrefix(String);

impl UploadPrefix {
    pub fn parse(prefix: &str) -> Result<Self, String> {
        if !prefix.starts_with('/') {
            return Err(format!("upload path {prefix:?} must start with '/'"));
        }
        let trimmed = prefix.trim_end_matches('/');
        if trimmed.is_empty() {
            return Ok(UploadPrefix(String::new()));
        }
        for seg in trimmed[1..].split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(format!(
                    "upload path {prefix:?} has an empty, '.' or '..' segment"
                ));
            }
            if seg
                .chars()
                .any(|c| c.is_control() || c == '\\' || c == '%' || c == '?' || c == '#')
            {
                return Err(format!(
                    "upload path {prefix:?} may only hold plain URL segments (no '%', '?', '#', '\\' or control characters)"
                ));
            }
        }
        Ok(UploadPrefix(trimmed.to_string()))
    }

    /// `/` for the root, else the prefix as configured, without a trailing slash.
    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "/" } else { &self.0 }
    }

    /// The length of the prefix in segments; the longest matching prefix wins.
    pub fn depth(&self) -> usize {
        self.0.matches('/').count()
    }

    /// The part of `url_path` below this prefix (still percent-encoded), or None when the path is
    /// not under it. The prefix must match whole segments: `/up` is not a prefix of `/upload/x`.
    pub fn strip<'a>(&self, url_path: &'a str) -> Option<&'a str> {
        let rest = url_path.strip_prefix(self.0.as_str())?;
        if rest.is_empty() {
            return Some("");
        }
        rest.strip_prefix('/')
    }
}

/// Maps the part of a URL path below an upload prefix to a relative path under the data folder.
/// Whether two request paths name the same resource: equal once percent-decoded, so that
/// `/up/a{1}.bin` and `/up/a%7B1%7D.bin` (as a proxy or a forwarding member may re-encode it)
/// are one upload.
pub fn same_url_path(a: &str, b: &str) -> bool {
    a == b || percent_decode_str(a).eq(percent_decode_str(b))
}

/// Refused: empty names (a directory), `.` and `..` (also percent-encoded), encoded slashes,
/// backslashes, NUL and other control characters, invalid UTF-8, over-long names, and the
/// session folder's name as the first segment.
pub fn destination_path(below_prefix: &str) -> Result<PathBuf, BitsError> {
    let bad = |why: String| BitsError::invalid(format!("the upload URL is not allowed: {why}"));
    if below_prefix.is_empty() {
        return Err(bad(
            "it names the upload directory itself; add a file name to the URL".into(),
        ));
    }
    if below_prefix.len() > MAX_PATH_BYTES * 3 {
        return Err(bad("the path is too long".into()));
    }
    let mut path = PathBuf::new();
    for (i, raw) in below_prefix.split('/').enumerate() {
        let seg = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| bad(format!("segment {raw:?} is not valid UTF-8 once decoded")))?;
        if seg.is_empty() {
            return Err(bad(
                "it has an empty segment ('//' or a trailing '/'); a destination must be a file"
                    .into(),
            ));
        }
        if seg == "." || seg == ".." {
            return Err(bad(format!("segment {raw:?} is '.' or '..'")));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| *c == '/' || *c == '\\' || c.is_control())
        {
            return Err(bad(format!(
                "segment {raw:?} contains the forbidden character {c:?}"
            )));
        }
        if seg.len() > MAX_SEGMENT_BYTES {
            return Err(bad(format!(
                "a name is longer than {MAX_SEGMENT_BYTES} bytes"
            )));
        }
        if i == 0 && seg.eq_ignore_ascii_case(SESSION_DIR) {
            return Err(bad(format!(
                "{SESSION_DIR} is reserved for the server's session state"
            )));
        }
        path.push(seg.as_ref());
    }
    if path.as_os_str().len() > MAX_PATH_BYTES {
        return Err(bad("the path is too long".into()));
    }
    debug_assert!(is_contained(&path));
    Ok(path)
}

/// Refuses a destination that could never be committed below the data folder `root`: a full path
/// longer than the system takes, or a name longer than `name_max` bytes (the NAME_MAX of the
/// folder's file system: 255 on most, less on some). Checked at Create-Session, so that the client
/// is told at once (400, fatal) instead of uploading everything for a Close that fails forever.
pub fn check_fits(root: &Path, destination: &Path, name_max: usize) -> Result<(), BitsError> {
    let full = root.join(destination).as_os_str().len();
    if full > MAX_FULL_PATH_BYTES {
        return Err(BitsError::invalid(format!(
            "the upload URL is not allowed: its path on the server would be {full} bytes long, \
             over the system's limit of {MAX_FULL_PATH_BYTES}; use a shorter URL"
        )));
    }
    if let Some(long) = destination
        .components()
        .map(|c| c.as_os_str().len())
        .find(|len| *len > name_max)
    {
        return Err(BitsError::invalid(format!(
            "the upload URL is not allowed: a name in it is {long} bytes long, and the server's \
             file system takes at most {name_max}; use shorter names"
        )));
    }
    Ok(())
}

/// True when a relative path can only go down: every component a plain name.
pub fn is_contained(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_that_differ_only_in_percent_encoding_are_the_same_upload() {
        assert!(same_url_path("/up/a{1}.bin", "/up/a%7B1%7D.bin"));
        assert!(same_url_path("/up/a%7b1%7d.bin", "/up/a{1}.bin"));
        assert!(same_url_path("/up/x", "/up/x"));
        assert!(!same_url_path("/up/x", "/up/y"));
        assert!(!same_url_path("/up/a%2Fb", "/up/a/c"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = UploadPrefix::parse("/upload/").unwrap();
        assert_eq!(p.as_str(), "/upload");
        assert_eq!(p.strip("/upload/a/b.bin"), Some("a/b.bin"));
        assert_eq!(p.strip("/upload"), Some(""));
        assert_eq!(p.strip("/uploads/a"), None);
        assert_eq!(p.strip("/other/a"), None);
        let root = UploadPrefix::parse("/").unwrap();
        assert_eq!(root.strip("/a.bin"), Some("a.bin"));
        assert_eq!(root.depth(), 0);
        assert_eq!(UploadPrefix::parse("/a/b").unwrap().depth(), 2);
        assert!(UploadPrefix::parse("upload").is_err());
        assert!(UploadPrefix::parse("/a/../b").is_err());
        assert!(UploadPrefix::parse("/a%2e").is_err());
    }

    #[test]
    fn plain_paths_map_below_the_data_folder() {
        assert_eq!(
            destination_path("a/b.bin").unwrap(),
            PathBuf::from("a/b.bin")
        );
        assert_eq!(
            destination_path("dumps/crash%20report.dmp").unwrap(),
            PathBuf::from("dumps/crash report.dmp")
        );
        assert_eq!(
            destination_path("%C3%A9t%C3%A9.log").unwrap(),
            PathBuf::from("été.log")
        );
        assert_eq!(destination_path("...").unwrap(), PathBuf::from("..."));
        assert_eq!(
            destination_path("x/BITS-Sessions").unwrap(),
            PathBuf::from("x/BITS-Sessions")
        );
    }

    #[test]
    fn escapes_and_hostile_names_are_refused() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/../../etc/passwd",
            "%2e%2e/etc/passwd",
            "%2E%2E/x",
            "a/%2e%2e/%2e%2e/x",
            ".",
            "a/./b",
            "a//b",
            "a/",
            "/etc/passwd",
            "a%2fb",
            "a%2F..%2F..%2Fb",
            "a\\b",
            "a%5cb",
            "..%5c..%5cwindows",
            "a%00b",
            "a\u{0}b",
            "a%0ab",
            "%ff.bin",
            "BITS-Sessions/Requests/x",
            "bits-sessions",
            "%42ITS-Sessions",
        ] {
            let err = destination_path(bad).expect_err(bad);
            assert_eq!(err.status, 400, "{bad}");
        }
        assert!(destination_path(&"a".repeat(256)).is_err());
        assert!(destination_path(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn a_destination_must_fit_the_systems_limits_below_its_root() {
        let root = Path::new("/srv/data");
        // "/srv/data/" is 10 bytes: 4085 are left for the destination. (Names of any length here,
        // to see the whole path's limit alone.)
        let fits = PathBuf::from("a".repeat(200)).join("b".repeat(4085 - 201));
        assert_eq!(root.join(&fits).as_os_str().len(), 4095);
        assert!(check_fits(root, &fits, usize::MAX).is_ok());
        let over = PathBuf::from("a".repeat(200)).join("b".repeat(4085 - 200));
        let e = check_fits(root, &over, usize::MAX).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("4096 bytes long"), "{e}");
        // A file system with shorter names (eCryptfs: 143) refuses what ext4 takes.
        let name = PathBuf::from("n".repeat(200));
        assert!(check_fits(root, &name, 255).is_ok());
        let e = check_fits(root, &name, 143).unwrap_err();
        assert!(
            e.message.contains("200 bytes long") && e.message.contains("143"),
            "{e}"
        );
    }

    proptest! {
        // The oracle: whatever the URL, an accepted destination never leaves the data folder.
        #[test]
        fn accepted_paths_stay_inside(s in "[a-zA-Z0-9./%\\\\_-]{0,40}") {
            if let Ok(p) = destination_path(&s) {
                prop_assert!(is_contained(&p));
                prop_assert!(p.components().count() >= 1);
                let first = p.components().next().unwrap().as_os_str().to_string_lossy().to_ascii_lowercase();
                prop_assert_ne!(first, SESSION_DIR.to_ascii_lowercase());
            }
        }

        // Whatever fits is short enough for one system call from the file system's root, name by
        // name and whole; whatever is refused is too long one way or the other.
        #[test]
        fn what_fits_can_be_named_in_one_call(
            root_len in 1usize..4200,
            names in prop::collection::vec(1usize..300, 1..20),
            name_max in 100usize..=255,
        ) {
            let root = PathBuf::from(format!("/{}", "r".repeat(root_len)));
            let dest: PathBuf = names.iter().map(|n| "x".repeat(*n)).collect();
            let full = root.join(&dest).as_os_str().len();
            let longest = names.iter().copied().max().unwrap_or(0);
            match check_fits(&root, &dest, name_max) {
                Ok(()) => prop_assert!(full <= MAX_FULL_PATH_BYTES && longest <= name_max),
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(full > MAX_FULL_PATH_BYTES || longest > name_max);
                }
            }
        }

        #[test]
        fn percent_encoded_dots_are_caught(pre in "[a-z]{0,3}", post in "[a-z]{0,3}") {
            for dots in ["%2e%2e", "%2E.", ".%2e", ".."] {
                let s = format!("{pre}/{dots}/{post}");
                prop_assert!(destination_path(&s).is_err());
            }
        }
    }
}
