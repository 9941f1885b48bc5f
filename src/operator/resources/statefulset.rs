//! The StatefulSet of upload servers.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimStatus,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildOptions, COMPONENT_SERVER, CONFIG_FILE_NAME, CONFIG_HASH_ANNOTATION, CONFIG_MOUNT, Names,
    labels, meta, selector_labels,
};
use crate::api::membership::HANDOFF_SECRET_DIR;
use crate::api::{ADMIN_PORT, DATA_ROOT, SECRETS_ROOT, SERVER_PORT, UploadFarm};

/// The uid the server runs as: not root, and the owner of the session volume (fsGroup).
const SERVER_UID: i64 = 65532;
const DATA_VOLUME: &str = "data";
const CONFIG_VOLUME: &str = "config";

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            // The admin port: plain http whatever the uploads need (TLS, credentials).
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

fn server_container(farm: &UploadFarm, opts: &BuildOptions) -> Container {
    let spec = &farm.spec;
    Container {
        name: "server".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| opts.default_image.clone()),
        ),
        image_pull_policy: Some(format!("{:?}", spec.image_pull_policy)),
        command: Some(vec!["bitsfarm".into()]),
        args: Some(vec![
            "--log-format".into(),
            "json".into(),
            "serve".into(),
            "--config".into(),
            format!("{CONFIG_MOUNT}/{CONFIG_FILE_NAME}"),
        ]),
        // The server expands {pod}, {ordinal} and {namespace} in its host-id template from these.
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![
            // Named after the scheme (`http` or `https`), which the Services' target ports name.
            ContainerPort {
                name: Some(spec.scheme().into()),
                container_port: i32::from(SERVER_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: i32::from(ADMIN_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        // A stopping pod first drains: no new sessions, the open ones finish (up to the drain
        // timeout); the hook then returns and the kubelet's SIGTERM stops the empty server. The
        // server stays up once empty (`stay`), so the hook ends before process 1 does: a hook
        // still running when process 1 exits is killed, and recorded as a failed hook.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "bitsfarm".into(),
                        "drain".into(),
                        "--admin".into(),
                        format!("127.0.0.1:{}", crate::api::ADMIN_PORT),
                        "--wait".into(),
                        drain_timeout(spec).to_string(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CONFIG_VOLUME.into(),
                mount_path: CONFIG_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: DATA_VOLUME.into(),
                mount_path: DATA_ROOT.into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// The volume claim template, written out as the API server stores it (with its defaults
/// `volumeMode: Filesystem` and `status.phase: Pending`). `volumeClaimTemplates` is an atomic list
/// for server-side apply: a template that leaves the defaults out differs from the stored one, and
/// every re-apply then rewrites the StatefulSet's managed fields (a new resourceVersion and a
/// wake-up of every watcher) although nothing changed. Seen on Kubernetes 1.20.
fn volume_claim(farm: &UploadFarm) -> PersistentVolumeClaim {
    let s = &farm.spec.storage;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(selector_labels(&Names::of(farm).farm)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: s.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(s.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            volume_mode: Some("Filesystem".into()),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: Some(PersistentVolumeClaimStatus {
            phase: Some("Pending".into()),
            ..PersistentVolumeClaimStatus::default()
        }),
    }
}

/// Mounts the farm's handoff Secret and the Secrets named in `spec.security` read-only under
/// `SECRETS_ROOT` (where the config points).
fn with_secrets(farm: &UploadFarm, mut server: Container, volumes: &mut Vec<Volume>) -> Container {
    let handoff = Some(Names::of(farm).handoff_secret());
    let none = crate::api::FarmSecurity::default();
    let sec = farm.spec.security.as_ref().unwrap_or(&none);
    let mounts = [
        (HANDOFF_SECRET_DIR, &handoff),
        ("auth", &sec.auth_secret_name),
        ("tokens", &sec.tokens_secret_name),
        ("tls", &sec.tls_secret_name),
        ("backend", &sec.backend_credentials_secret_name),
    ];
    for (dir, secret) in mounts {
        let Some(secret) = secret else { continue };
        let name = format!("secret-{dir}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        server
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name,
                mount_path: format!("{SECRETS_ROOT}/{dir}"),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    server
}

/// How long a stopping server may drain: the spec's drain timeout, else the fallback timeout.
pub fn drain_timeout(spec: &crate::api::UploadFarmSpec) -> i64 {
    spec.drain_timeout_seconds
        .unwrap_or(spec.host_ids.fallback_timeout_seconds)
        .max(1)
}

/// The StatefulSet of `replicas` servers running the configuration `config_hash` names.
pub fn stateful_set(
    farm: &UploadFarm,
    config_hash: &str,
    replicas: i32,
    opts: &BuildOptions,
) -> StatefulSet {
    let names = Names::of(farm);
    let spec = &farm.spec;
    let mut pod_annotations = spec.pod_annotations.clone().unwrap_or_default();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());
    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.config_map(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut claims = None;
    if spec.storage.empty_dir {
        volumes.push(Volume {
            name: DATA_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(spec.storage.size.clone())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
    } else {
        claims = Some(vec![volume_claim(farm)]);
    }
    // Only servers that know the field get it (1.27+): older API servers reject unknown fields
    // in strict decoding or silently drop them, and neither is what the user asked for.
    let retention = (opts.pvc_retention_policy && !spec.storage.empty_dir).then(|| {
        // Deleting the farm deletes its session data; scaling down keeps it, so scaling back up
        // lets the clients of those ordinals resume.
        StatefulSetPersistentVolumeClaimRetentionPolicy {
            when_deleted: Some("Delete".into()),
            when_scaled: Some("Retain".into()),
        }
    });
    let server = with_secrets(farm, server_container(farm, opts), &mut volumes);
    StatefulSet {
        metadata: meta(farm, names.stateful_set(), COMPONENT_SERVER, None),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.headless_service()),
            // The servers do not depend on each other: start and stop them all at once.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&names.farm)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&names.farm, COMPONENT_SERVER)),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![server],
                    // The drain, then the 30 s the server gives requests in flight after SIGTERM.
                    termination_grace_period_seconds: Some(drain_timeout(spec) + 30),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(SERVER_UID),
                        run_as_group: Some(SERVER_UID),
                        fs_group: Some(SERVER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    affinity: spec.affinity.clone(),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: claims,
            persistent_volume_claim_retention_policy: retention,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The StatefulSet as the body of a server-side apply. Each volume claim template carries
/// `metadata.creationTimestamp: null`, as the API server stores it: `volumeClaimTemplates` is an
/// atomic list, so a template that differs from the stored one in anything, even an absent
/// versus a null field, makes every apply a change to the managed fields (Kubernetes 1.20 then
/// writes a new resourceVersion on every reconcile). k8s-openapi leaves unset fields out, hence
/// this step.
pub fn apply_body(sts: &StatefulSet) -> Result<serde_json::Value, serde_json::Error> {
    let mut body = serde_json::to_value(sts)?;
    if let Some(templates) = body
        .pointer_mut("/spec/volumeClaimTemplates")
        .and_then(|t| t.as_array_mut())
    {
        for t in templates {
            if let Some(meta) = t.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                meta.entry("creationTimestamp")
                    .or_insert(serde_json::Value::Null);
            }
        }
    }
    Ok(body)
}
