//! The farm's Services: the headless governing Service of the StatefulSet, one Service per pod
//! (the host-id addresses), and the shared Service for new uploads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    COMPONENT_HEADLESS_SERVICE, COMPONENT_HOST_SERVICE, COMPONENT_SHARED_SERVICE, Names,
    ORDINAL_LABEL, meta, selector_labels,
};
use crate::api::{SERVER_PORT, UploadFarm};

/// The upload port, named after the scheme the servers speak (`http`, or `https` with TLS), as
/// is the container port it targets: what a cluster admin, a service mesh or an ingress
/// controller reads to know how to talk to it.
fn upload_port(farm: &UploadFarm, port: i32) -> Vec<ServicePort> {
    let name = farm.spec.scheme();
    vec![ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }]
}

/// The StatefulSet's governing Service. It publishes addresses of pods that are not ready yet
/// so that a starting pod's DNS name exists before its readiness probe passes.
pub fn headless_service(farm: &UploadFarm) -> Service {
    let names = Names::of(farm);
    Service {
        metadata: meta(
            farm,
            names.headless_service(),
            COMPONENT_HEADLESS_SERVICE,
            None,
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&names.farm)),
            ports: Some(upload_port(farm, i32::from(SERVER_PORT))),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Service of pod `ordinal`: the address its host id names. It selects the pod through the
/// label the StatefulSet controller puts on every pod for exactly this purpose.
pub fn host_service(farm: &UploadFarm, ordinal: i32) -> Service {
    let names = Names::of(farm);
    let pod = names.pod(ordinal);
    let annotations = farm.spec.host_ids.service_annotations.as_ref().map(|a| {
        a.iter()
            .map(|(k, v)| {
                let v = v
                    .replace("{pod}", &pod)
                    .replace("{ordinal}", &ordinal.to_string());
                (k.clone(), v)
            })
            .collect::<BTreeMap<_, _>>()
    });
    let mut metadata = meta(farm, pod.clone(), COMPONENT_HOST_SERVICE, annotations);
    if let Some(l) = metadata.labels.as_mut() {
        l.insert(ORDINAL_LABEL.into(), ordinal.to_string());
    }
    let mut selector = selector_labels(&names.farm);
    selector.insert("statefulset.kubernetes.io/pod-name".into(), pod);
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(farm.spec.host_ids.service_type.as_str().into()),
            // A draining pod leaves readiness (and so the shared Service) but its clients must
            // still reach it here to finish their sessions.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector),
            // The shared Service's port: a client's URL keeps its port when the host id
            // names none.
            ports: Some(upload_port(farm, farm.spec.service_port())),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The farm's shared address: any ready pod may take a new upload session.
pub fn shared_service(farm: &UploadFarm) -> Service {
    let names = Names::of(farm);
    let spec = &farm.spec.service;
    Service {
        metadata: meta(
            farm,
            names.shared_service(),
            COMPONENT_SHARED_SERVICE,
            spec.annotations.clone(),
        ),
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().into()),
            selector: Some(selector_labels(&names.farm)),
            ports: Some(upload_port(farm, farm.spec.service_port())),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
