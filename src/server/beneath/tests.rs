//! Links planted in a folder, met in every way `Beneath` reaches it, with `openat2` and with the
//! walk that stands in for it: a link is never followed, and nothing outside the folder changes.

use std::fs;
use std::os::unix::fs::symlink;
use std::time::SystemTime;

use proptest::prelude::*;

use super::*;

const RESOLVERS: [Resolver; 2] = [Resolver::Openat2, Resolver::Walk];

/// `T/data` (the folder) and `T/outside` (what links point at), with links planted in the folder:
/// to a folder outside, to a file outside, dangling, relative upwards, and two that stay inside.
struct Planted {
    top: tempfile::TempDir,
}

impl Planted {
    fn new() -> Planted {
        let top = tempfile::tempdir().unwrap();
        let (data, out) = (top.path().join("data"), top.path().join("outside"));
        fs::create_dir_all(data.join("a")).unwrap();
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("victim.txt"), b"victim").unwrap();
        fs::write(out.join("sub").join("inner.txt"), b"inner").unwrap();
        fs::write(data.join("file.txt"), b"file").unwrap();
        fs::write(data.join("a").join("f.txt"), b"f").unwrap();
        symlink(&out, data.join("lnk_dir")).unwrap();
        symlink(&out, data.join("a").join("lnk_dir")).unwrap();
        symlink(out.join("victim.txt"), data.join("lnk_file")).unwrap();
        symlink(out.join("nope"), data.join("dangling")).unwrap();
        symlink("../outside", data.join("rel_up")).unwrap();
        symlink(".", data.join("self_link")).unwrap();
        symlink("..", data.join("a").join("inside_link")).unwrap();
        Planted { top }
    }

    fn data(&self) -> PathBuf {
        self.top.path().join("data")
    }

    fn outside(&self) -> PathBuf {
        self.top.path().join("outside")
    }

    fn beneath(&self, resolver: Resolver) -> Beneath {
        let b = Beneath::open(&self.data()).unwrap();
        if resolver == Resolver::Openat2 {
            assert_eq!(b.resolver(), Resolver::Openat2, "this kernel has openat2");
        }
        b.with_resolver(resolver)
    }

    /// Every entry outside, links not followed, with its content and modification time.
    fn outside_now(&self) -> Vec<(PathBuf, Vec<u8>, Option<SystemTime>)> {
        let mut out = Vec::new();
        let mut stack = vec![self.outside()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let m = fs::symlink_metadata(e.path()).unwrap();
                let content = if m.is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.push((e.path(), content, m.modified().ok()));
            }
        }
        out.sort();
        out
    }

    fn is_link(&self, rel: &Path) -> bool {
        fs::symlink_metadata(self.data().join(rel)).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// Whether a folder on the way to `rel` (not `rel` itself) is a link now.
    fn link_on_the_way(&self, rel: &Path) -> bool {
        rel.ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| self.is_link(a))
    }
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

#[track_caller]
fn assert_link_refused<T: std::fmt::Debug>(r: io::Result<T>, what: &str) {
    match r {
        Err(e) => assert!(met_link(&e), "{what}: expected ELOOP, got {e}"),
        Ok(v) => panic!("{what}: a link was followed: {v:?}"),
    }
}

#[test]
fn a_link_on_the_way_or_at_the_end_is_never_followed() {
    for r in RESOLVERS {
        let t = Planted::new();
        let before = t.outside_now();
        let b = t.beneath(r);
        let what = |s: &str| format!("{r:?}: {s}");
        assert_eq!(b.read(p("file.txt")).unwrap(), b"file");
        assert_eq!(b.read(p("a/f.txt")).unwrap(), b"f");
        assert_link_refused(b.read(p("lnk_dir/victim.txt")), &what("read through"));
        assert_link_refused(b.read(p("a/lnk_dir/victim.txt")), &what("read deep"));
        assert_link_refused(b.read(p("lnk_file")), &what("read a link"));
        assert_link_refused(b.read(p("rel_up/victim.txt")), &what("read upwards"));
        assert_link_refused(b.read(p("self_link/file.txt")), &what("read inside"));
        assert_link_refused(b.read(p("a/inside_link/file.txt")), &what("read back up"));
        assert_link_refused(b.metadata(p("lnk_file")), &what("metadata of a link"));
        assert_link_refused(b.metadata(p("lnk_dir")), &what("metadata of a folder link"));
        assert_link_refused(b.read_dir(p("lnk_dir")), &what("list through"));
        let create = OFlags::WRONLY | OFlags::CREATE;
        assert_link_refused(
            b.open_fd(p("dangling"), create),
            &what("create at a dangling link"),
        );
        assert_link_refused(
            b.open_fd(p("lnk_file"), create | OFlags::TRUNC),
            &what("truncate"),
        );
        assert_link_refused(b.open_fd(p("lnk_dir/new"), create), &what("create through"));
        assert_link_refused(
            b.create_dir_all(p("lnk_dir/x/y")),
            &what("mkdir -p through"),
        );
        assert_link_refused(b.create_dir_all(p("a/lnk_dir/x")), &what("mkdir -p deep"));
        assert_link_refused(
            b.create_dir_all(p("dangling/x")),
            &what("mkdir -p dangling"),
        );
        assert_link_refused(b.create_dir(p("lnk_dir/x")), &what("mkdir through"));
        assert_link_refused(
            b.hard_link(p("file.txt"), p("lnk_dir/h")),
            &what("link into"),
        );
        assert_link_refused(
            b.hard_link(p("lnk_dir/victim.txt"), p("h")),
            &what("link from"),
        );
        assert_link_refused(
            b.rename(p("file.txt"), p("lnk_dir/victim.txt")),
            &what("rename"),
        );
        assert_link_refused(
            b.remove_file(p("lnk_dir/victim.txt")),
            &what("unlink through"),
        );
        assert_link_refused(b.remove_all(p("lnk_dir/sub")), &what("rm -r through"));
        assert_link_refused(
            b.write_atomic(p("lnk_dir/w"), b"x", true),
            &what("write through"),
        );
        assert_link_refused(b.sync_dir(p("lnk_dir")), &what("sync through"));
        assert_eq!(t.outside_now(), before, "{r:?}: outside changed");
        assert!(!t.outside().join("nope").exists() && !t.outside().join("x").exists());
    }
}

#[test]
fn names_that_are_links_are_acted_on_as_names() {
    for r in RESOLVERS {
        let t = Planted::new();
        let before = t.outside_now();
        let b = t.beneath(r);
        // Removing a link removes the link; a folder holding links loses them, their targets stay.
        b.remove_all(p("lnk_dir")).unwrap();
        b.remove_file(p("lnk_file")).unwrap();
        b.remove_all(p("a")).unwrap();
        assert!(!t.data().join("a").exists() && !t.is_link(p("lnk_dir")));
        // A hard link never replaces a name, a link included; a rename replaces the name only.
        let e = b.hard_link(p("file.txt"), p("dangling")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{r:?}");
        b.write_atomic(p("rel_up"), b"replaced", false).unwrap();
        assert_eq!(fs::read(t.data().join("rel_up")).unwrap(), b"replaced");
        b.rename(p("file.txt"), p("self_link")).unwrap();
        assert_eq!(b.read(p("self_link")).unwrap(), b"file");
        assert_eq!(t.outside_now(), before, "{r:?}: outside changed");
    }
}

#[test]
fn folders_are_made_and_files_on_the_way_are_named() {
    for r in RESOLVERS {
        let t = Planted::new();
        let b = t.beneath(r);
        b.create_dir_all(p("n/m/o")).unwrap();
        b.create_dir_all(p("n/m/o")).unwrap();
        assert!(t.data().join("n/m/o").is_dir());
        let e = b.create_dir_all(p("file.txt/x")).unwrap_err();
        assert!(met_file(&e), "{r:?}: {e}");
        let e = b.open_fd(p("file.txt/x"), OFlags::RDONLY).unwrap_err();
        assert!(met_file(&e), "{r:?}: {e}");
        let e = b.read(p("missing/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{r:?}");
        b.write_atomic(p("n/m/o/rec.json"), b"{}", true).unwrap();
        assert_eq!(b.read(p("n/m/o/rec.json")).unwrap(), b"{}");
        assert_eq!(
            b.read_dir(p("n/m/o")).unwrap(),
            vec![OsString::from("rec.json")]
        );
        b.hard_link(p("n/m/o/rec.json"), p("n/h.json")).unwrap();
        b.rename(p("n/h.json"), p("n/m/r.json")).unwrap();
        assert_eq!(b.metadata(p("n/m/r.json")).unwrap().len(), 2);
        b.remove_all(p("n")).unwrap();
        b.remove_all(p("n")).unwrap();
        assert!(!t.data().join("n").exists());
        for bad in ["/etc/passwd", "../outside/victim.txt", "a/../../x", "./a"] {
            let e = b.read(p(bad)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
            let e = b.remove_all(p(bad)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        assert!(
            b.remove_file(p("")).is_err(),
            "the folder itself has no name"
        );
    }
}

#[test]
fn the_folder_can_be_named_by_its_empty_path() {
    let t = Planted::new();
    let b = t.beneath(Resolver::Walk);
    let mut names = b.read_dir(p("")).unwrap();
    names.sort();
    assert!(names.contains(&OsString::from("file.txt")), "{names:?}");
    b.sync_dir(p("")).unwrap();
    assert!(b.name_max().unwrap() >= 255);
}

/// One thing `Beneath` does to a path or two.
#[derive(Debug, Clone)]
enum Op {
    CreateDirAll(PathBuf),
    CreateDir(PathBuf),
    CreateFile(PathBuf),
    WriteAtomic(PathBuf),
    HardLink(PathBuf, PathBuf),
    Rename(PathBuf, PathBuf),
    RemoveFile(PathBuf),
    RemoveAll(PathBuf),
    Read(PathBuf),
    Metadata(PathBuf),
    ReadDir(PathBuf),
}

fn rel_path() -> impl Strategy<Value = PathBuf> {
    let name = prop::sample::select(vec![
        "a",
        "b",
        "f.txt",
        "file.txt",
        "lnk_dir",
        "lnk_file",
        "dangling",
        "rel_up",
        "self_link",
        "inside_link",
        "sub",
        "victim.txt",
    ]);
    prop::collection::vec(name, 1..5).prop_map(|names| names.iter().collect())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        rel_path().prop_map(Op::CreateDirAll),
        rel_path().prop_map(Op::CreateDir),
        rel_path().prop_map(Op::CreateFile),
        rel_path().prop_map(Op::WriteAtomic),
        (rel_path(), rel_path()).prop_map(|(a, b)| Op::HardLink(a, b)),
        (rel_path(), rel_path()).prop_map(|(a, b)| Op::Rename(a, b)),
        rel_path().prop_map(Op::RemoveFile),
        rel_path().prop_map(Op::RemoveAll),
        rel_path().prop_map(Op::Read),
        rel_path().prop_map(Op::Metadata),
        rel_path().prop_map(Op::ReadDir),
    ]
}

fn run(b: &Beneath, op: &Op) -> io::Result<()> {
    let data = b"written by the test";
    match op {
        Op::CreateDirAll(x) => b.create_dir_all(x),
        Op::CreateDir(x) => b.create_dir(x),
        Op::CreateFile(x) => b
            .open_file(x, OFlags::WRONLY | OFlags::CREATE)
            .and_then(|mut f| f.write_all(data)),
        Op::WriteAtomic(x) => b.write_atomic(x, data, false),
        Op::HardLink(x, y) => b.hard_link(x, y),
        Op::Rename(x, y) => b.rename(x, y),
        Op::RemoveFile(x) => b.remove_file(x),
        Op::RemoveAll(x) => b.remove_all(x),
        Op::Read(x) => b.read(x).map(drop),
        Op::Metadata(x) => b.metadata(x).map(drop),
        Op::ReadDir(x) => b.read_dir(x).map(drop),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    // The oracle: whatever is done, in whatever order, to whatever paths, nothing outside the
    // folder changes, and an operation that succeeds had no link on its way (nor at its end, when
    // it opens what the path names).
    #[test]
    fn nothing_outside_is_ever_touched(ops in prop::collection::vec(op(), 1..10)) {
        for r in RESOLVERS {
            let t = Planted::new();
            let before = t.outside_now();
            let b = t.beneath(r);
            for op in &ops {
                let links = links_in_the_way(&t, op);
                let result = run(&b, op);
                prop_assert!(
                    result.is_err() || links.is_empty(),
                    "{:?}: {:?} succeeded through a link at {:?}", r, op, links
                );
                prop_assert_eq!(&t.outside_now(), &before, "{:?}: {:?} changed the outside", r, op);
            }
        }
    }
}

/// The paths of `op` with a link where `op` must not meet one, before it runs: on the way, and at
/// the end too when `op` opens what the path names (rather than acting on the name).
fn links_in_the_way(t: &Planted, op: &Op) -> Vec<PathBuf> {
    let paths: Vec<(PathBuf, bool)> = match op {
        Op::CreateDirAll(x)
        | Op::CreateFile(x)
        | Op::Read(x)
        | Op::Metadata(x)
        | Op::ReadDir(x) => {
            vec![(x.clone(), true)]
        }
        Op::CreateDir(x) | Op::WriteAtomic(x) | Op::RemoveFile(x) | Op::RemoveAll(x) => {
            vec![(x.clone(), false)]
        }
        Op::HardLink(x, y) | Op::Rename(x, y) => vec![(x.clone(), false), (y.clone(), false)],
    };
    paths
        .into_iter()
        .filter(|(x, last_too)| t.link_on_the_way(x) || (*last_too && t.is_link(x)))
        .map(|(x, _)| x)
        .collect()
}
