//! `bitsfarm crd` and `bitsfarm render`, run as the real binary.

use std::path::Path;
use std::process::Command;

fn bitsfarm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args(args)
        .output()
        .expect("bitsfarm runs")
}

#[test]
fn crd_command_prints_the_committed_crd() {
    let out = bitsfarm(&["crd"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/uploadfarm.yaml"))
            .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "crds/uploadfarm.yaml differs from `bitsfarm crd`: regenerate it"
    );
}

#[test]
fn render_prints_every_object_for_each_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("kind: UploadFarm") {
            continue;
        }
        seen += 1;
        let out = bitsfarm(&["render", "-f", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = String::from_utf8(out.stdout).unwrap();
        let replicas: usize = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("replicas:"))
            .map_or(1, |n| n.trim().parse().unwrap());
        // A farm that asks for a NetworkPolicy gets one more object.
        let policies = usize::from(text.contains("networkPolicy:\n    enabled: true"));
        assert_eq!(
            yaml.matches("\nkind: NetworkPolicy\n").count(),
            policies,
            "{}",
            path.display()
        );
        // A farm of two servers or more gets a PodDisruptionBudget (none asks for it off).
        let budgets = usize::from(replicas >= 2);
        assert_eq!(
            yaml.matches("\nkind: PodDisruptionBudget\n").count(),
            budgets,
            "{}",
            path.display()
        );
        for kind in ["ConfigMap", "StatefulSet"] {
            assert_eq!(
                yaml.matches(&format!("\nkind: {kind}\n")).count(),
                1,
                "{}: {kind}",
                path.display()
            );
        }
        // headless + one per pod + shared
        assert_eq!(
            yaml.matches("\nkind: Service\n").count(),
            replicas + 2,
            "{}",
            path.display()
        );
        // ... and the handoff Secret.
        assert_eq!(
            yaml.matches("---\n").count(),
            replicas + 5 + policies + budgets,
            "{}",
            path.display()
        );
        assert!(yaml.contains("bitsfarm.io/config-hash"));
    }
    assert!(
        seen >= 3,
        "expected UploadFarm examples in {}",
        dir.display()
    );
}

#[test]
fn render_fails_clearly_on_an_invalid_spec() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: x\nspec:\n  backend:\n    notification: ByValue\n",
    )
    .unwrap();
    let out = bitsfarm(&["render", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.backend.url is required"), "{err}");

    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
    )
    .unwrap();
    let out = bitsfarm(&["render", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an UploadFarm"));

    let out = bitsfarm(&["render", "-f", "/nonexistent/farm.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// What `render` prints for `path` (it must succeed): its text, and its documents.
fn rendered(path: &Path) -> (String, Vec<serde_json::Value>) {
    let out = bitsfarm(&["render", "-f", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_saphyr::from_multiple(&text).expect("render prints YAML documents");
    (text, docs)
}

/// Every pod mounts `NAME-handoff`; the operator creates it with a random key. `render` prints it
/// too, with a fresh key each run, and says so in a comment.
#[test]
fn render_prints_the_handoff_secret_every_pod_mounts_with_a_fresh_key() {
    let farm = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/uploadfarm-minimal.yaml");
    let key_of = |docs: &[serde_json::Value]| -> String {
        let secret = docs
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "uploads-handoff")
            .unwrap_or_else(|| panic!("no Secret uploads-handoff among {docs:#?}"));
        assert_eq!(secret["apiVersion"], "v1");
        assert_eq!(secret["metadata"]["namespace"], "default");
        let key = secret["stringData"]["secret"]
            .as_str()
            .unwrap_or_else(|| panic!("stringData.secret in {secret:#}"));
        key.to_string()
    };
    let (text, docs) = rendered(&farm);
    let first = key_of(&docs);
    assert!(
        first.len() >= bitsfarm::server::handoff::MIN_SECRET_LEN,
        "a key of {} bytes; the servers need {}",
        first.len(),
        bitsfarm::server::handoff::MIN_SECRET_LEN
    );
    // 32 random bytes, as hex (what the operator makes).
    assert_eq!(first.len(), 64, "{first}");
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    let comment = text
        .lines()
        .find(|l| l.starts_with('#') && l.to_lowercase().contains("generated"))
        .unwrap_or_else(|| panic!("no comment saying the key is generated:\n{text}"));
    assert!(comment.contains("random"), "{comment}");
    // The Secret is the one the pods mount.
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "uploads-handoff"),
        "{volumes:#?}"
    );
    let (_, again) = rendered(&farm);
    assert_ne!(first, key_of(&again), "each render makes a new key");
}

/// `spec.replicass: 3` is a typo, refused with the key and its line by `render` and `farm -f`
/// alike (as `serve --config` refuses an unknown key).
#[test]
fn render_and_farm_refuse_an_unknown_key_naming_it_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: web\nspec:\n  replicass: 3\n",
            "spec.replicass",
            "line 6",
        ),
        (
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  directories:\n    - path: /a\n    - path: /b\n      backend:\n        url: http://b/in\n        notifcation: ByValue\n",
            "spec.directories[1].backend.notifcation",
            "line 12",
        ),
        (
            "apiVersion: bitsfarm.io/v1alpha1\nkind: UploadFarm\nmetadata:\n  name: web\n  lables:\n    a: b\nspec: {}\n",
            "metadata.lables",
            "line 5",
        ),
    ];
    for (i, (yaml, key, line)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("farm-{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = bitsfarm(&["render", "-f", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "render took {key}");
        assert!(
            err.contains(key) && err.contains(line) && err.contains(&file.display().to_string()),
            "render: {err}"
        );
        let farm_dir = dir.path().join(format!("farm-data-{i}"));
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
                .args(["farm", "--shared", "127.0.0.1:0", "-f"])
                .arg(&file)
                .arg("--data-dir")
                .arg(&farm_dir),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "farm -f took {key}");
        assert!(err.contains(key) && err.contains(line), "farm -f: {err}");
        assert!(!farm_dir.exists(), "farm -f started something: {err}");
    }
}

/// `render -f` of a file with other objects says what the file holds and what it expects, not
/// how the YAML library reads several documents.
#[test]
fn render_of_a_file_without_an_uploadfarm_says_what_the_file_holds() {
    let receiver = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/receiver.yaml");
    let out = bitsfarm(&["render", "-f", receiver.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for what in [
        "PersistentVolumeClaim receiver-data",
        "Deployment receiver",
        "Service receiver",
        "UploadFarm",
        "bitsfarm.io/v1alpha1",
    ] {
        assert!(err.contains(what), "{what} missing from: {err}");
    }
    assert!(!err.contains("from_str_multiple"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    let out = bitsfarm(&["render", "-f", empty.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no object") && err.contains("UploadFarm"),
        "{err}"
    );
}

/// Runs `cmd` to its end, killed after 60 s.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bitsfarm runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("bitsfarm did not exit within 60 s");
}
