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
        assert_eq!(
            yaml.matches("---\n").count(),
            replicas + 4 + policies + budgets,
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
