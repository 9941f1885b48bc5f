//! The Dockerfile, built rather than read.
//!
//! - Its build stage runs for real: `tests/cluster/image.py build-stage` gives a folder exactly
//!   what the stage's COPY lines copy and runs the stage's RUN command there (the release build,
//!   cached outside the checkout so later runs rebuild nothing). The binary must come out and
//!   report the crate's version, and the folder must hold exactly the copied paths and nothing
//!   else of the checkout: the proof that the copies are complete (a missing file fails the build).
//! - The final stage, as `image.py bitsfarm` emulates it from that binary (the image the test
//!   cluster runs), puts the binary on PATH where the chart's Deployment and the farm pods run
//!   `bitsfarm`, as the uid they run as.
//! - Where a Docker or BuildKit engine answers, `docker build` builds the Dockerfile itself and the
//!   image's binary runs; elsewhere the test says in one line that it left that out.
//!
//! The cache is `$BITSFARM_K8S_CACHE/dockerfile-build`, else `/var/cache/bitsfarm/dockerfile-build`
//! when writable, else `~/.cache/bitsfarm/dockerfile-build` (the same roots as
//! tests/cluster/cluster.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Straight to stderr, past the test harness's capture, so a skip or a long wait is never silent.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BITSFARM_K8S_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("dockerfile-build");
    }
    let system = Path::new("/var/cache/bitsfarm");
    if std::fs::create_dir_all(system).is_ok() && tempfile::tempfile_in(system).is_ok() {
        return system.join("dockerfile-build");
    }
    let user_cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set: no place for the build cache");
    user_cache.join("bitsfarm/dockerfile-build")
}

fn image_py() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tests/cluster/image.py"))
        .current_dir(root());
    cmd
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

struct Built {
    context: PathBuf,
    binary: PathBuf,
}

/// The build stage, run once per test binary (image.py also holds a lock on the cache folder).
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cache = cache_dir();
        note(&format!(
            "dockerfile: running the Dockerfile's build stage in {} (a cold release build takes \
             minutes; later runs only check it)",
            cache.display()
        ));
        let out = image_py()
            .arg("build-stage")
            .arg("--cache")
            .arg(&cache)
            .output()
            .expect("python3 runs tests/cluster/image.py (install python3)");
        assert!(
            out.status.success(),
            "image.py build-stage failed ({}); its log ends:\n{}",
            out.status,
            tail(&out.stderr, 60)
        );
        let binary = PathBuf::from(last_line(&out));
        assert!(
            binary.is_file(),
            "image.py build-stage printed {binary:?}, which is not a file"
        );
        Built {
            context: cache.join("context"),
            binary,
        }
    })
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).expect("read the Dockerfile")
}

/// Where the build stage's COPY lines put each file of the checkout, relative to WORKDIR (the
/// simple forms only: image.py refuses every other one before it builds anything).
fn copied_paths(dockerfile: &str) -> BTreeMap<String, PathBuf> {
    let mut in_build = false;
    let mut copied = BTreeMap::new();
    for line in dockerfile.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
        let words: Vec<&str> = words.collect();
        if keyword == "FROM" {
            in_build = words.len() == 3 && words[2].eq_ignore_ascii_case("build");
            continue;
        }
        if !in_build || keyword != "COPY" {
            continue;
        }
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        let dest = dest.trim_start_matches("./");
        for src in sources {
            let path = root().join(src);
            if path.is_dir() {
                for file in walk(&path) {
                    let inner = file.strip_prefix(&path).expect("walk stays inside");
                    let inner = inner.to_string_lossy();
                    let target = if dest.is_empty() {
                        inner.to_string()
                    } else {
                        format!("{}/{inner}", dest.trim_end_matches('/'))
                    };
                    copied.insert(target, file);
                }
            } else {
                let name = path.file_name().expect("a file name").to_string_lossy();
                let target = if dest.is_empty() || dest.ends_with('/') {
                    format!("{dest}{name}")
                } else {
                    dest.to_string()
                };
                copied.insert(target, path);
            }
        }
    }
    copied
}

/// Every file (or link) below `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if meta.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_build_stage_builds_the_binary_from_exactly_what_it_copies() {
    let built = built();

    let out = Command::new(&built.binary)
        .arg("--version")
        .output()
        .expect("the built binary runs");
    assert!(out.status.success(), "{}", tail(&out.stderr, 20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("bitsfarm {VERSION}"),
        "the image's binary is the crate's version"
    );

    // The context holds exactly what the COPY lines copy (besides cargo's target/ and the RUN
    // command's out/), byte for byte: nothing else of the checkout was there to build from.
    let wanted = copied_paths(&dockerfile());
    assert!(
        wanted.contains_key("Cargo.toml") && wanted.keys().any(|k| k.starts_with("src/")),
        "the build stage copies no Cargo.toml or src/: {:?}",
        wanted.keys().collect::<Vec<_>>()
    );
    let mut present = BTreeSet::new();
    let mut tops = BTreeSet::new();
    for entry in std::fs::read_dir(&built.context).expect("read the context folder") {
        let name = entry.expect("a folder entry").file_name();
        let name = name.to_string_lossy().to_string();
        if name == "target" || name == "out" {
            continue;
        }
        let path = built.context.join(&name);
        let files = if path.is_dir() {
            walk(&path)
        } else {
            vec![path]
        };
        for file in files {
            let rel = file
                .strip_prefix(&built.context)
                .expect("inside the context")
                .to_string_lossy()
                .to_string();
            present.insert(rel);
        }
        tops.insert(name);
    }
    for absent in ["tests", ".git", "charts", "examples", "target-fuzz", "fuzz"] {
        assert!(
            !tops.contains(absent),
            "{absent} is in the build context {}: only what the Dockerfile copies may be",
            built.context.display()
        );
    }
    let wanted_names: BTreeSet<String> = wanted.keys().cloned().collect();
    let extra: Vec<_> = present.difference(&wanted_names).collect();
    let missing: Vec<_> = wanted_names.difference(&present).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the build context {} is not what the Dockerfile copies: extra {extra:?}, missing \
         {missing:?}",
        built.context.display()
    );
    for (rel, source) in &wanted {
        let ours = std::fs::read(built.context.join(rel)).expect("read the context's copy");
        let theirs = std::fs::read(source).expect("read the checkout's file");
        assert!(
            ours == theirs,
            "{rel} in the context differs from {source:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// The image archive image.py writes (a tar with an OCI layout and a docker manifest.json).

struct TarEntry {
    mode: u32,
    uid: u64,
    kind: u8,
    link: String,
    data: Vec<u8>,
}

/// Every entry of a tar archive, by path.
fn read_tar(bytes: &[u8]) -> BTreeMap<String, TarEntry> {
    let mut entries = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().expect("a tar archive") {
        let mut entry = entry.expect("a tar entry");
        let header = entry.header().clone();
        let name = entry
            .path()
            .expect("an entry path")
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let link = entry
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).expect("read a tar entry");
        entries.insert(
            name,
            TarEntry {
                mode: header.mode().expect("a mode"),
                uid: header.uid().expect("a uid"),
                kind: header.entry_type().as_byte(),
                link,
                data,
            },
        );
    }
    entries
}

struct Image {
    name: String,
    config: Value,
    layer: BTreeMap<String, TarEntry>,
}

fn load_image(archive: &Path) -> Image {
    let bytes = std::fs::read(archive).expect("read the image archive");
    let outer = read_tar(&bytes);
    let json = |name: &str| -> Value {
        let entry = outer
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in the archive"));
        serde_json::from_slice(&entry.data).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let blob = |digest: &str| -> &[u8] {
        let hex = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("digest {digest}"));
        let data = &outer
            .get(&format!("blobs/sha256/{hex}"))
            .unwrap_or_else(|| panic!("blob {digest} is not in the archive"))
            .data;
        let actual: String = Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(actual, hex, "blob {digest} does not have its digest");
        data
    };
    assert_eq!(json("oci-layout")["imageLayoutVersion"], "1.0.0");
    let index = json("index.json");
    let descriptor = &index["manifests"][0];
    let name = descriptor["annotations"]["io.containerd.image.name"]
        .as_str()
        .expect("index.json names the image")
        .to_string();
    let manifest: Value = serde_json::from_slice(blob(
        descriptor["digest"].as_str().expect("a manifest digest"),
    ))
    .expect("the manifest is JSON");
    let config_digest = manifest["config"]["digest"].as_str().expect("config");
    let config: Value = serde_json::from_slice(blob(config_digest)).expect("config JSON");
    let layer_digest = manifest["layers"][0]["digest"].as_str().expect("a layer");
    let layer = read_tar(blob(layer_digest));
    assert_eq!(
        config["rootfs"]["diff_ids"][0], layer_digest,
        "the layer is uncompressed: its digest is its diff id"
    );
    // The docker side of the archive names the same config and layer.
    let docker = json("manifest.json");
    assert_eq!(
        docker[0]["Config"].as_str(),
        Some(format!("blobs/sha256/{}", &config_digest[7..]).as_str())
    );
    Image {
        name,
        config,
        layer,
    }
}

impl Image {
    fn path_var(&self) -> Vec<String> {
        self.config["config"]["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str()?.strip_prefix("PATH="))
            .flat_map(|p| p.split(':').map(str::to_string))
            .collect()
    }

    /// What a command without a slash resolves to on the image's PATH (an executable file).
    fn which(&self, command: &str) -> Option<String> {
        self.path_var().into_iter().find_map(|dir| {
            let path = format!("{}/{command}", dir.trim_end_matches('/'));
            let entry = self.layer.get(path.trim_start_matches('/'))?;
            (entry.kind == b'0' && entry.mode & 0o111 != 0).then_some(path)
        })
    }

    fn uid(&self) -> i64 {
        let user = self.config["config"]["User"].as_str().unwrap_or("0");
        user.split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("the image's User {user:?} is not numeric"))
    }
}

/// The chart's Deployment and the farm pods run `bitsfarm` from the image's PATH, as the image's
/// uid; the image carries what the binary needs and what distroless carries for it.
#[test]
fn the_image_runs_the_binary_the_chart_and_the_farm_pods_run() {
    let built = built();
    let dir = tempfile::tempdir().expect("a temp folder");
    let archive = dir.path().join("bitsfarm.tar");
    let out = image_py()
        .arg("bitsfarm")
        .arg("--binary")
        .arg(&built.binary)
        .arg("--tag")
        .arg(format!("bitsfarm:{VERSION}"))
        .arg("--out")
        .arg(&archive)
        .output()
        .expect("python3 runs tests/cluster/image.py");
    assert!(out.status.success(), "{}", tail(&out.stderr, 30));
    let reference = format!("docker.io/library/bitsfarm:{VERSION}");
    assert_eq!(last_line(&out), reference);

    let image = load_image(&archive);
    assert_eq!(image.name, reference);
    let config = &image.config["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/bitsfarm"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["--help"]));
    for port in ["8080/tcp", "8081/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "{port} exposed");
    }
    let env: Vec<&str> = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"));

    // The binary the build stage made, where the entrypoint and PATH find it.
    let entry = &image.layer["usr/local/bin/bitsfarm"];
    assert_eq!(entry.mode, 0o755);
    let binary = std::fs::read(&built.binary).expect("read the built binary");
    assert!(entry.data == binary, "the image's binary is the built one");
    let on_path = image.which("bitsfarm");
    assert_eq!(on_path.as_deref(), Some("/usr/local/bin/bitsfarm"));

    // What distroless gives the binary: the nonroot user, a home it owns, /tmp, CA certificates;
    // and what glibc needs: the loader. No shell.
    let passwd = String::from_utf8_lossy(&image.layer["etc/passwd"].data).to_string();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:"))
    );
    assert_eq!(image.layer["home/nonroot"].uid, 65532);
    assert_eq!(image.layer["tmp"].mode, 0o1777);
    assert!(
        !image.layer["etc/ssl/certs/ca-certificates.crt"]
            .data
            .is_empty()
    );
    assert!(
        image.layer.keys().any(|k| k.contains("ld-linux")),
        "the dynamic loader is in the image"
    );
    assert!(image.which("sh").is_none(), "no shell in the image");
    assert!(
        image
            .layer
            .values()
            .all(|e| e.kind != b'2' || !e.link.is_empty())
    );

    // The chart's Deployment: `command: ["bitsfarm"]` as `runAsUser: 65532`.
    let template =
        std::fs::read_to_string(root().join("charts/bitsfarm-operator/templates/deployment.yaml"))
            .expect("read the chart's Deployment template");
    let value = |key: &str| {
        template
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("the Deployment template has no {key}"))
    };
    let command: Vec<String> =
        serde_json::from_str(&value("command:")).expect("command is a JSON-style list");
    assert_eq!(
        image.which(&command[0]),
        on_path,
        "the chart runs {command:?}, which the image's PATH must resolve to its binary"
    );
    assert_eq!(
        value("runAsUser:").parse::<i64>().ok(),
        Some(image.uid()),
        "the chart's runAsUser is the image's user"
    );

    // The farm pods the operator makes: their command and preStop run `bitsfarm`, as the uid
    // (and fsGroup) of the image's user.
    let rendered = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(["render", "-f"])
        .arg(root().join("examples/uploadfarm-minimal.yaml"))
        .output()
        .expect("bitsfarm render runs");
    assert!(rendered.status.success(), "{}", tail(&rendered.stderr, 20));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&rendered.stdout))
        .expect("bitsfarm render prints YAML");
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("a StatefulSet is rendered");
    let pod = &sts["spec"]["template"]["spec"];
    for container in pod["containers"].as_array().expect("containers") {
        for command in [
            &container["command"],
            &container["lifecycle"]["preStop"]["exec"]["command"],
        ] {
            if let Some(program) = command[0].as_str() {
                assert_eq!(
                    image.which(program),
                    on_path,
                    "a farm pod runs {program}, which must be the image's binary"
                );
            }
        }
    }
    assert_eq!(pod["securityContext"]["runAsUser"], image.uid());
    assert_eq!(pod["securityContext"]["fsGroup"], image.uid());
}

// ------------------------------------------------------------------------------------------
// A real engine, where there is one.

/// Runs `cmd` with a deadline; None when it cannot start or does not finish in time. Its output
/// is read while it runs, so a chatty command (a build) cannot stall on a full pipe.
fn run_for(mut cmd: Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Some(Output {
        status: status?,
        stdout,
        stderr,
    })
}

fn answers(program: &str, args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    match run_for(cmd, Duration::from_secs(30)) {
        None => Err(format!(
            "`{program} {}` did not run or answer",
            args.join(" ")
        )),
        Some(out) if !out.status.success() => Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            tail(&out.stderr, 1)
        )),
        Some(_) => Ok(()),
    }
}

/// `docker build` of the Dockerfile itself, and its binary run.
fn docker_build() {
    let mut build = Command::new("docker");
    build
        .args(["build", "-t", "bitsfarm:test", "."])
        .current_dir(root());
    let out = run_for(build, Duration::from_secs(3600)).expect("docker build ran within the hour");
    assert!(
        out.status.success(),
        "docker build failed:\n{}",
        tail(&out.stderr, 40)
    );
    let mut run = Command::new("docker");
    run.args(["run", "--rm", "bitsfarm:test", "--version"]);
    let out = run_for(run, Duration::from_secs(120)).expect("docker run finished");
    assert!(out.status.success(), "{}", tail(&out.stderr, 20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("bitsfarm {VERSION}")
    );
}

/// BuildKit without Docker: the Dockerfile built into an OCI archive (nothing here runs it).
fn buildkit_build() {
    let dir = tempfile::tempdir().expect("a temp folder");
    let dest = dir.path().join("image.tar");
    let mut build = Command::new("buildctl");
    build
        .args([
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            "context=.",
            "--local",
            "dockerfile=.",
            "--output",
        ])
        .arg(format!("type=oci,dest={}", dest.display()))
        .current_dir(root());
    let out =
        run_for(build, Duration::from_secs(3600)).expect("buildctl build ran within the hour");
    assert!(
        out.status.success(),
        "buildctl build failed:\n{}",
        tail(&out.stderr, 40)
    );
    note("dockerfile: BuildKit built the Dockerfile; there is no engine here to run the image");
}

#[test]
fn an_engine_builds_the_dockerfile_where_there_is_one() {
    match (
        answers("docker", &["info"]),
        answers("buildctl", &["debug", "workers"]),
    ) {
        (Ok(()), _) => docker_build(),
        (Err(_), Ok(())) => buildkit_build(),
        (Err(docker), Err(buildkit)) => note(&format!(
            "dockerfile: the engine build (docker build) was left out: no engine answers \
             ({docker}; {buildkit})"
        )),
    }
}
