//! Pure builders of the objects the operator applies for an UploadFarm. No I/O here: the same
//! functions serve reconcile, `bitsfarm render` and the tests.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::membership::{self, HANDOFF_SECRET_KEY};
use crate::api::{InvalidSpec, UploadFarm, server_config};

mod disruption_budget;
mod network_policy;
mod services;
mod statefulset;

pub use disruption_budget::disruption_budget;
pub use network_policy::{backend_ports, network_policy};
pub use services::{headless_service, host_service, shared_service};
pub use statefulset::{apply_body as stateful_set_apply_body, drain_timeout, stateful_set};

/// The one field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "bitsfarm-operator";
pub const MANAGED_BY: &str = "bitsfarm-operator";
pub const APP_NAME: &str = "bitsfarm";
/// Pod-template annotation holding the config hash: changing it rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "bitsfarm.io/config-hash";
/// Label on per-pod Services naming their ordinal.
pub const ORDINAL_LABEL: &str = "bitsfarm.io/ordinal";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const COMPONENT_SERVER: &str = "upload-server";
pub const COMPONENT_HOST_SERVICE: &str = "host-service";
pub const COMPONENT_SHARED_SERVICE: &str = "shared-service";
pub const COMPONENT_HEADLESS_SERVICE: &str = "headless-service";
pub const COMPONENT_CONFIG: &str = "config";
pub const COMPONENT_HANDOFF_SECRET: &str = "handoff-secret";
pub const COMPONENT_NETWORK_POLICY: &str = "network-policy";
pub const COMPONENT_DISRUPTION_BUDGET: &str = "disruption-budget";
pub const CONFIG_FILE_NAME: &str = "config.yaml";
pub const CONFIG_MOUNT: &str = "/etc/bitsfarm";

/// What the builders need besides the farm itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Image used when the spec names none: the operator's own.
    pub default_image: String,
    /// The API server knows `persistentVolumeClaimRetentionPolicy` (Kubernetes 1.27 and later).
    pub pvc_retention_policy: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            default_image: default_image(),
            pvc_retention_policy: false,
        }
    }
}

/// The operator's own image when nothing else says: this build's version.
pub fn default_image() -> String {
    format!("bitsfarm:{}", env!("CARGO_PKG_VERSION"))
}

/// Names of a farm's children, all derived from the farm's name only, so that the StatefulSet's
/// immutable fields (selector, serviceName) never change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub farm: String,
    pub namespace: String,
}

impl Names {
    pub fn of(farm: &UploadFarm) -> Self {
        Names {
            farm: farm.name_any(),
            namespace: farm.namespace().unwrap_or_else(|| "default".to_string()),
        }
    }
    pub fn stateful_set(&self) -> String {
        self.farm.clone()
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.farm)
    }
    pub fn headless_service(&self) -> String {
        format!("{}-headless", self.farm)
    }
    pub fn shared_service(&self) -> String {
        self.farm.clone()
    }
    /// The secret the farm's servers share to hand sessions to each other; generated once.
    pub fn handoff_secret(&self) -> String {
        format!("{}-handoff", self.farm)
    }
    /// The farm's NetworkPolicy, when `spec.networkPolicy.enabled`. Not the bare farm name: a
    /// policy the user made for the farm is likely to be called that.
    pub fn network_policy(&self) -> String {
        format!("{}-network-policy", self.farm)
    }
    /// The farm's PodDisruptionBudget: the farm's own name (a kind of its own, so no clash).
    pub fn disruption_budget(&self) -> String {
        self.farm.clone()
    }
    /// Per-pod Services are named after their pods, so `{pod}.{namespace}.svc...` resolves to them.
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.farm)
    }
}

/// The labels that select a farm's pods. Immutable in the StatefulSet: name-derived only.
pub fn selector_labels(farm: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (INSTANCE_LABEL.to_string(), farm.to_string()),
    ])
}

/// `selector_labels` as the label-selector string of `status.selector` and list calls.
pub fn selector_string(farm: &str) -> String {
    selector_labels(farm)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The label selector of everything the operator made for a farm (all its children carry these
/// labels): what the sweep of leftover children lists, kind by kind.
pub fn owned_selector(farm: &str) -> String {
    format!("{},{MANAGED_BY_LABEL}={MANAGED_BY}", selector_string(farm))
}

const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The `app.kubernetes.io/*` labels of every child.
pub fn labels(farm: &str, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(farm);
    l.insert(COMPONENT_LABEL.into(), component.into());
    l.insert("app.kubernetes.io/part-of".into(), APP_NAME.into());
    l.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    l.insert(
        "app.kubernetes.io/version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    l
}

pub(crate) fn meta(
    farm: &UploadFarm,
    name: String,
    component: &str,
    annotations: Option<BTreeMap<String, String>>,
) -> ObjectMeta {
    let names = Names::of(farm);
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace),
        labels: Some(labels(&names.farm, component)),
        annotations: annotations.filter(|a| !a.is_empty()),
        owner_references: owner(farm).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The controller owner reference; absent when the farm has no uid yet (offline `render`),
/// since the API server rejects an owner reference without one.
fn owner(farm: &UploadFarm) -> Option<OwnerReference> {
    farm.controller_owner_ref(&())
}

/// The farm's handoff Secret holding `secret` (64 hex characters from the operator's random
/// source). Created once and never rewritten: a new secret would orphan every open session id.
pub fn handoff_secret(farm: &UploadFarm, secret: &str) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: meta(
            farm,
            Names::of(farm).handoff_secret(),
            COMPONENT_HANDOFF_SECRET,
            None,
        ),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            HANDOFF_SECRET_KEY.to_string(),
            secret.to_string(),
        )])),
        ..Default::default()
    }
}

/// The server configuration as the ConfigMap's `config.yaml`, and its hash: the configuration
/// plus what only the farm's name gives, how the servers reach each other for session handoff.
pub fn config_yaml(farm: &UploadFarm) -> Result<(String, String), InvalidSpec> {
    let mut file = server_config(&farm.spec)?;
    let names = Names::of(farm);
    file.handoff = Some(membership::pods(
        &farm.spec,
        &names.stateful_set(),
        &names.headless_service(),
    ));
    let yaml = file
        .to_yaml()
        .map_err(|e| InvalidSpec(format!("cannot write the server configuration: {e}")))?;
    let digest = Sha256::digest(yaml.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok((yaml, hash))
}

pub fn config_map(farm: &UploadFarm, yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(farm, Names::of(farm).config_map(), COMPONENT_CONFIG, None),
        data: Some(BTreeMap::from([(
            CONFIG_FILE_NAME.to_string(),
            yaml.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Everything the operator applies for one farm, in apply order (the headless Service before
/// the StatefulSet that names it, the NetworkPolicy before the pods it restricts, the
/// PodDisruptionBudget last: it protects pods, so it need not precede them).
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub config_hash: String,
    pub config_map: ConfigMap,
    pub headless_service: Service,
    /// `None` when the spec asks for no NetworkPolicy (an earlier one is then swept away).
    pub network_policy: Option<NetworkPolicy>,
    pub stateful_set: StatefulSet,
    pub host_services: Vec<Service>,
    pub shared_service: Service,
    /// `None` for a farm of fewer than two servers or one that asks for no budget (an earlier
    /// one is then swept away).
    pub disruption_budget: Option<PodDisruptionBudget>,
}

/// The longest farm name: its per-pod Services are named `{name}-{ordinal}` and must stay DNS
/// labels (63 characters), and the StatefulSet's pods carry `{name}-{hash}` as a label value.
pub const MAX_NAME_LEN: usize = 52;

/// The name rule of the CRD's CEL validation, checked again here because API servers before 1.25
/// drop CEL rules: a name that cannot name the farm's Services is refused before anything is
/// applied, instead of half a farm and an API error.
pub fn check_name(name: &str) -> Result<(), InvalidSpec> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last() != Some(&b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidSpec(format!(
            "metadata.name {name:?} cannot name the farm's Services: it must start with a letter, \
             hold only lower-case letters, digits and '-', and be at most {MAX_NAME_LEN} characters; \
             create the farm under another name"
        )))
    }
}

/// A farm whose spec was checked and turned into its server configuration: every child follows
/// from it and from how many servers run, which only a scale-down under way makes differ from the
/// spec. Checking first lets an invalid spec stop a reconcile before it asks any server to drain.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<'a> {
    farm: &'a UploadFarm,
    yaml: String,
    config_hash: String,
    network_policy: Option<NetworkPolicy>,
}

/// Checks the farm's name and spec, and writes the servers' configuration.
pub fn check(farm: &UploadFarm) -> Result<Checked<'_>, InvalidSpec> {
    check_name(&farm.name_any())?;
    let (yaml, config_hash) = config_yaml(farm)?;
    Ok(Checked {
        farm,
        yaml,
        config_hash,
        network_policy: network_policy(farm)?,
    })
}

impl Checked<'_> {
    /// The children of a farm that runs `servers` upload servers: the spec's replicas, or more
    /// while a scale-down waits for the servers it removes to drain (they keep their pods and
    /// their own Services, so their clients reach them, until they are done).
    pub fn children(&self, opts: &BuildOptions, servers: i32) -> Children {
        let farm = self.farm;
        let servers = servers.max(farm.spec.replicas);
        Children {
            config_map: config_map(farm, &self.yaml),
            headless_service: headless_service(farm),
            network_policy: self.network_policy.clone(),
            stateful_set: stateful_set(farm, &self.config_hash, servers, opts),
            host_services: (0..servers.max(0)).map(|i| host_service(farm, i)).collect(),
            shared_service: shared_service(farm),
            disruption_budget: disruption_budget(farm, servers),
            config_hash: self.config_hash.clone(),
        }
    }
}

/// The children of the farm as its spec asks for them.
pub fn children(farm: &UploadFarm, opts: &BuildOptions) -> Result<Children, InvalidSpec> {
    Ok(check(farm)?.children(opts, farm.spec.replicas))
}

impl Children {
    /// Every object as JSON, in apply order.
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = vec![
            serde_json::to_value(&self.config_map)?,
            serde_json::to_value(&self.headless_service)?,
        ];
        if let Some(np) = &self.network_policy {
            out.push(serde_json::to_value(np)?);
        }
        out.push(serde_json::to_value(&self.stateful_set)?);
        for s in &self.host_services {
            out.push(serde_json::to_value(s)?);
        }
        out.push(serde_json::to_value(&self.shared_service)?);
        if let Some(budget) = &self.disruption_budget {
            out.push(serde_json::to_value(budget)?);
        }
        Ok(out)
    }

    /// The name of every Service the farm asks for: what the sweep of leftover Services keeps.
    pub fn service_names(&self) -> Vec<String> {
        std::iter::once(&self.headless_service)
            .chain(&self.host_services)
            .chain(std::iter::once(&self.shared_service))
            .map(ResourceExt::name_any)
            .collect()
    }
}

/// The in-cluster address of the shared Service (`host:port`).
pub fn shared_address(farm: &UploadFarm) -> String {
    let n = Names::of(farm);
    format!(
        "{}.{}.svc.cluster.local:{}",
        n.shared_service(),
        n.namespace,
        farm.spec.service_port()
    )
}

/// The shared Service as a URL clients start uploads at: the scheme the servers speak, and the
/// port only when it is not that scheme's default.
pub fn shared_url(farm: &UploadFarm) -> String {
    let n = Names::of(farm);
    let spec = &farm.spec;
    let port = spec.service_port();
    let port = if port == spec.default_port() {
        String::new()
    } else {
        format!(":{port}")
    };
    format!(
        "{}://{}.{}.svc.cluster.local{port}",
        spec.scheme(),
        n.shared_service(),
        n.namespace
    )
}

/// The host id pod `ordinal` hands out: the servers' template (with the port, when it is not the
/// scheme's default) expanded as the server expands it.
pub fn host_id(farm: &UploadFarm, ordinal: i32) -> String {
    let n = Names::of(farm);
    let pod = n.pod(ordinal);
    let env = |k: &str| match k {
        "POD_NAME" => Some(pod.clone()),
        "POD_NAMESPACE" => Some(n.namespace.clone()),
        _ => None,
    };
    let template = farm.spec.host_id_template();
    crate::config::expand_host_id(&template, env).unwrap_or(template)
}

#[cfg(test)]
pub(crate) mod tests;
