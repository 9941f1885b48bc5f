//! The `UploadFarm` custom resource (`bitsfarm.io/v1alpha1`): the public contract between a farm's
//! owner and the operator. Field docs become the CRD's descriptions (`kubectl explain`), serde
//! defaults become schema defaults, and `x_kube(validation)` rules become CEL rules.
//!
//! Also what follows from a spec without a cluster: reading a manifest (`manifest`), the server
//! configuration (`server_config`) and how the members reach each other (`membership`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub mod manifest;
pub mod membership;
mod server_config;
pub use server_config::{
    ADMIN_PORT, DATA_ROOT, InvalidSpec, SECRETS_ROOT, SERVER_PORT, server_config,
};

pub const GROUP: &str = "bitsfarm.io";
pub const DEFAULT_HOST_ID_TEMPLATE: &str = "{pod}.{namespace}.svc.cluster.local";
pub const DEFAULT_UPLOAD_PATH: &str = "/";
pub const DEFAULT_STORAGE_SIZE: &str = "1Gi";
/// The Services' port when `service.port` is unset: the default port of the scheme the servers
/// speak, so that a URL without a port reaches them.
pub const DEFAULT_SERVICE_PORT: i32 = 80;
pub const DEFAULT_TLS_SERVICE_PORT: i32 = 443;

/// An UploadFarm runs a set of BITS upload servers. Each server (pod) has its own address, which
/// it hands to clients as BITS-Host-Id so that every fragment of an upload reaches the server that
/// holds the session; all servers share one address for new sessions.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bitsfarm.io",
    version = "v1alpha1",
    kind = "UploadFarm",
    plural = "uploadfarms",
    singular = "uploadfarm",
    shortname = "uf",
    category = "bitsfarm",
    namespaced,
    status = "UploadFarmStatus",
    derive = "PartialEq",
    cel,
    doc = "An UploadFarm runs a set of BITS upload servers, each with its own host-id address, behind one shared address.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "Upload servers wanted"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether every upload server is ready"),
    printcolumn(name = "Host-IDs", type_ = "string", json_path = ".spec.hostIds.serviceType", description = "How each server's own address is exposed"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", description = "The shared address for new uploads", priority = 1),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].message", priority = 1),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52")
        .message("the name must start with a letter, hold only lower-case letters, digits and '-', and be at most 52 characters: it names the StatefulSet, its pods and their Services"),
)]
#[serde(rename_all = "camelCase")]
pub struct UploadFarmSpec {
    /// Number of upload servers (pods). Each gets its own host-id address and session storage.
    /// Scaling down removes the highest ordinals and their per-pod Services.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Container image of the upload servers. Defaults to the operator's own image, so the servers
    /// always speak the version of the protocol the operator expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// When the kubelet pulls the image: Always, IfNotPresent or Never.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// URL path under which clients upload (the IIS virtual directory), e.g. /uploads. Used when
    /// `directories` is empty; otherwise each directory names its own path.
    #[serde(default = "default_upload_path")]
    #[schemars(regex(pattern = r"^/"), length(max = 1024))]
    pub upload_path: String,

    /// Seconds without progress after which an unfinished upload session and its data are removed
    /// (BITSSessionTimeout). Applies to every directory.
    #[serde(default = "default_session_timeout")]
    #[schemars(range(min = 1))]
    pub session_timeout_seconds: i64,

    /// Seconds a stopping server (scale-down, node drain, rolling update) keeps serving its open
    /// sessions, while it takes no new ones, before it is stopped anyway. Defaults to
    /// `hostIds.fallbackTimeoutSeconds`: after that long the clients have fallen back anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub drain_timeout_seconds: Option<i64>,

    /// Where finished uploads go (BITSServerNotificationType and URL). Directories without a
    /// backend of their own use this one. Without any, files are kept on the pod's volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,

    /// Upload limits. Directories inherit what they leave out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// Several upload directories, each with its own URL path, backend and limits. When empty,
    /// the farm has one directory at `uploadPath`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e.path == d.path))").message("two directories use the same path; give each its own"))]
    #[schemars(length(max = 64))]
    pub directories: Vec<UploadDirectory>,

    /// Each server's own address (BITS-Host-Id) and how clients reach it.
    #[serde(default)]
    pub host_ids: HostIds,

    /// The shared Service through which clients start new uploads.
    #[serde(default)]
    pub service: SharedService,

    /// Storage for each server's session data: a PersistentVolumeClaim per pod unless `emptyDir`
    /// is set. Cannot be changed after creation (a StatefulSet's volume claim template is fixed).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage cannot be changed after creation: the StatefulSet's volume claim template is immutable; create a new UploadFarm instead"))]
    pub storage: Storage,

    /// CPU and memory requests and limits of the upload server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the pods must match to be scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Node and pod (anti-)affinity of the pods, e.g. to spread the servers over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Extra annotations on every pod (e.g. for a service mesh or a log shipper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// Authentication, TLS and credentials for the backend, each from a Secret in the farm's
    /// namespace, mounted into the servers (and re-read there when the Secret changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<FarmSecurity>,

    /// A NetworkPolicy (`NAME-network-policy`) for the farm's pods: ingress only to the upload
    /// port (and, if asked, the admin port), egress only to DNS, the backends and each other.
    /// The pods always keep ingress from and egress to each other on the upload port (a member
    /// hands packets to the member that holds their session), and DNS on port 53 (UDP and TCP)
    /// to any address (a node-local DNS cache is no pod a selector could name). It takes effect
    /// where the cluster's network plugin enforces NetworkPolicies (Calico, Cilium, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<FarmNetworkPolicy>,

    /// The farm's PodDisruptionBudget (named like the farm): how many servers a voluntary
    /// disruption (a node drain, an eviction) may take down at once. Made only for farms of two
    /// servers or more; a one-server farm gets none, so that it never blocks a node drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,
}

/// The farm's PodDisruptionBudget (`operator::resources::disruption_budget` builds it).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    /// Create the PodDisruptionBudget (for farms of two servers or more). Turning it off deletes
    /// the one the operator made.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Servers a voluntary disruption may take down at once: a number (at least 1) or a
    /// percentage of the servers (such as `25%`, rounded up by Kubernetes). Default 1, so a
    /// drain stops one server at a time: each drains its sessions (`drainTimeoutSeconds`) while
    /// the others serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("string(self).matches('^([1-9][0-9]*|([1-9][0-9]?|100)%)$')").message("maxUnavailable must be at least 1 or a percentage from 1% to 100%; 0 would block every node drain (set enabled: false to have no budget)"))]
    pub max_unavailable: Option<IntOrString>,
}

impl Default for DisruptionBudget {
    fn default() -> Self {
        DisruptionBudget {
            enabled: true,
            max_unavailable: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// The farm's NetworkPolicy: who may reach the servers and whom they may reach
/// (`operator::resources::network_policy` builds it).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FarmNetworkPolicy {
    /// Create the NetworkPolicy. Turning it off deletes the one the operator made.
    #[serde(default)]
    pub enabled: bool,

    /// Who may reach the upload port, as NetworkPolicy peers (pod and namespace selectors, IP
    /// blocks). Empty: anyone, which is what a farm behind a LoadBalancer needs (a load balancer
    /// usually hides the clients' addresses behind the nodes').
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ingress_from: Vec<NetworkPolicyPeer>,

    /// Who may reach each server's admin port (8081: /metrics, /healthz, /readyz and /drain),
    /// e.g. Prometheus's namespace. Empty: nobody (the kubelet's probes come from the pod's own
    /// node, which network policies do not block). A scale-down asks the servers it removes how
    /// many sessions they still hold through the API server's pod proxy: add the API servers'
    /// addresses (`ipBlock`) for it to wait for them; unreachable servers are removed at once and
    /// drain only in their preStop hook.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub admin_from: Vec<NetworkPolicyPeer>,

    /// Where the backends (`backend.url`, `directories[].backend.url`) run, as NetworkPolicy
    /// peers. Empty: any address, on the backend ports only (e.g. a backend outside the cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub backend_peers: Vec<NetworkPolicyPeer>,

    /// TCP ports the servers reach the backends on. Empty: the ports of the absolute backend
    /// URLs (the one a URL names, else 80 for http and 443 for https). Network policies see the
    /// port a Service forwards to, not the Service's own port: list the backend pods' port here
    /// when a backend's Service maps one to another, and for relative backend URLs (they go back
    /// to the address the client used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(range(min = 1, max = 65535)))]
    pub backend_ports: Vec<i32>,
}

/// Secrets the upload servers use. Their contents never appear in the UploadFarm, its status,
/// events or rendered objects: only their names do.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FarmSecurity {
    /// Secret whose key `users` holds HTTP Basic users, one `user:$argon2id$...` per line (made
    /// by `bitsfarm passwd USER`). With it, every packet needs credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub auth_secret_name: Option<String>,

    /// Secret whose key `tokens` holds bearer tokens, one `user:token` per line (clients send
    /// `Authorization: Bearer TOKEN`). With it, every packet needs credentials. Windows BITS
    /// clients cannot send tokens (they answer the Basic challenge of `authSecretName`): tokens
    /// are for other clients, such as scripts and services. It may name the same Secret as
    /// `authSecretName` when that one holds both keys (a field of its own, not an optional key:
    /// the operator does not read your Secrets, so it could not tell whether the key exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tokens_secret_name: Option<String>,

    /// A `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`, as cert-manager writes them): the
    /// servers then speak https, and pick up a renewed certificate without a restart. The
    /// Services' ports are then named `https` and default to 443 (`service.port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret_name: Option<String>,

    /// Secret whose key `header` holds one `Name: value` header (such as
    /// `Authorization: Bearer ...`) sent with every call to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub backend_credentials_secret_name: Option<String>,
}

fn default_replicas() -> i32 {
    1
}
fn default_upload_path() -> String {
    DEFAULT_UPLOAD_PATH.to_string()
}
fn default_session_timeout() -> i64 {
    crate::config::DEFAULT_SESSION_TIMEOUT_SECS as i64
}
fn default_fallback_timeout() -> i64 {
    crate::config::DEFAULT_FALLBACK_TIMEOUT_SECS as i64
}
fn default_notify_timeout() -> i64 {
    crate::config::DEFAULT_NOTIFY_TIMEOUT_SECS as i64
}
fn default_host_id_template() -> String {
    DEFAULT_HOST_ID_TEMPLATE.to_string()
}
fn default_storage_size() -> String {
    DEFAULT_STORAGE_SIZE.to_string()
}

/// When the kubelet pulls the image.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// How a Service is exposed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also reachable on a port of every node.
    NodePort,
    /// Also reachable through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// How a finished upload reaches the server application (BITSServerNotificationType).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Notification {
    /// No notification: the file is kept in the directory's data folder.
    #[default]
    None,
    /// POST the path of the stored file to the backend (it must share the volume).
    ByReference,
    /// POST the file itself as the request body.
    ByValue,
}

/// The server application that receives finished uploads.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.notification == 'None' || (has(self.url) && size(self.url) > 0)").message("backend.url is required unless notification is None"))]
pub struct Backend {
    /// URL of the server application (BITSServerNotificationURL). A relative URL is resolved
    /// against the upload's URL. Required unless `notification` is None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2200))]
    pub url: Option<String>,

    /// How the upload is handed over: None, ByReference or ByValue.
    #[serde(default)]
    pub notification: Notification,

    /// Seconds to wait for the server application's answer.
    #[serde(default = "default_notify_timeout")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: i64,
}

/// Upload limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest upload accepted, in bytes (BITSMaximumUploadSize). Unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_upload_size_bytes: Option<i64>,

    /// Let an upload replace an existing file of the same name (BITSAllowOverwrites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_overwrites: Option<bool>,
}

/// One upload directory (an IIS virtual directory with BITS enabled).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UploadDirectory {
    /// URL path of the directory, e.g. /photos.
    #[schemars(regex(pattern = r"^/"), length(max = 1024))]
    pub path: String,

    /// Where finished uploads to this directory go. Defaults to the farm's `backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,

    /// Limits of this directory. What is left out comes from the farm's `limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// Each server's own address, handed to clients as BITS-Host-Id (BITSHostId).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostIds {
    /// Address template of each server. `{pod}` is the pod's name, `{ordinal}` its number and
    /// `{namespace}` its namespace. The default is the in-cluster DNS name of the pod's own
    /// Service. With NodePort or LoadBalancer per-pod Services, use an address clients outside
    /// the cluster resolve, e.g. `up{ordinal}.example.com`. Clients keep the scheme of the URL
    /// they started with and replace only its host (and port, when the host id names one), so
    /// when `service.port` is not the scheme's default (80 for http, 443 for https) and the
    /// template names no port, `:PORT` is appended. Write a port into the template yourself when
    /// clients reach the servers on another one (a proxy in front of the per-pod Services, a
    /// NodePort). With TLS, the certificate must name every host id (e.g. a wildcard).
    #[serde(default = "default_host_id_template")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self.contains('{pod}') || self.contains('{ordinal}')").message("the host-id template must contain {pod} or {ordinal}, or every server would hand out the same address"))]
    pub template: String,

    /// Type of each pod's own Service: ClusterIP, NodePort or LoadBalancer.
    #[serde(default)]
    pub service_type: ServiceType,

    /// Annotations on each pod's own Service (e.g. for a cloud load balancer or external-dns).
    /// `{pod}` and `{ordinal}` in values are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_annotations: Option<BTreeMap<String, String>>,

    /// Seconds a client keeps sending to a server's own address after errors before it falls
    /// back to the shared address (BITSHostIdFallbackTimeout).
    #[serde(default = "default_fallback_timeout")]
    #[schemars(range(min = 1))]
    pub fallback_timeout_seconds: i64,
}

impl Default for HostIds {
    fn default() -> Self {
        HostIds {
            template: default_host_id_template(),
            service_type: ServiceType::default(),
            service_annotations: None,
            fallback_timeout_seconds: default_fallback_timeout(),
        }
    }
}

/// The shared Service: the farm's address for new uploads.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SharedService {
    /// Type of the shared Service: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,

    /// Port the shared Service and every per-pod Service listen on, in the scheme the servers
    /// speak (https with `security.tlsSecretName`, http without). Defaults to that scheme's
    /// port, 443 or 80, so that URLs need none. On another port, each host id carries it
    /// (`host:port`, see `hostIds.template`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Annotations on the shared Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Storage for each server's session data.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of each pod's volume, as a Kubernetes quantity (e.g. 10Gi). It must hold the
    /// unfinished uploads of that server.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,

    /// StorageClass of the volumes; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Keep session data in an emptyDir instead of a PersistentVolumeClaim. Unfinished uploads
    /// are lost whenever a pod restarts; meant for tests.
    #[serde(default)]
    pub empty_dir: bool,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            size: default_storage_size(),
            storage_class_name: None,
            empty_dir: false,
        }
    }
}

/// What the operator last saw of the farm.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadFarmStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Upload servers that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Upload servers that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the pods (for the scale subresource and autoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The shared address for new uploads (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// The shared address as clients use it: scheme, host and the port unless it is the
    /// scheme's default (`https://uploads.default.svc.cluster.local`). Upload URLs are this plus
    /// the upload path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// Hash of the server configuration the pods run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,

    /// One entry per upload server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostStatus>,

    /// A scale-down waiting for the servers it removes to finish their sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScaleDownStatus>,

    /// Ready (every server ready for the current spec), Progressing (a rollout or scaling is
    /// under way) and Degraded (something needs attention).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A scale-down under way: the servers above `toReplicas` are draining (no new sessions) and are
/// removed when their sessions are done or at `deadline`, whichever comes first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownStatus {
    /// Servers before the scale-down.
    pub from_replicas: i32,
    /// Servers after it.
    pub to_replicas: i32,
    /// When draining started (RFC 3339).
    pub started_at: String,
    /// When the draining servers are removed even with sessions left (RFC 3339).
    pub deadline: String,
    /// Sessions the draining servers still hold, as last reported.
    pub sessions_left: i64,
}

/// One upload server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// The pod's ordinal.
    pub ordinal: i32,
    /// The pod's name.
    pub pod: String,
    /// The address this server hands out as BITS-Host-Id.
    pub host_id: String,
    /// Whether the pod is ready.
    pub ready: bool,
    /// The server is draining before a scale-down removes it: it takes no new sessions and
    /// finishes its open ones (not ready, but still reachable at its host id).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// The CRD as YAML: what `bitsfarm crd` prints and `crds/uploadfarm.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(&UploadFarm::crd())
}

#[cfg(test)]
mod tests;
