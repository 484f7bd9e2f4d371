//! deploy/kubernetes/: Kubernetes' schemas (kubernetes-validate, strict), then ports, probes,
//! flags, the instance name, security settings, resources and the disruption budgets.

use std::process::Command;

use serde_json::Value;

use crate::{Help, assert_known_to, port_of, read, repo_root, venv_tool, yaml_documents};

/// The manifests `kubectl apply` takes (the kustomization lists all but the Job).
const MANIFESTS: &[&str] = &[
    "namespace.yaml",
    "coordinator.yaml",
    "user-service.yaml",
    "order-service.yaml",
    "create-tables-job.yaml",
];

/// The oldest Kubernetes the manifests are checked against: gRPC probes are GA since 1.27, and
/// 1.30 is the oldest minor release still supported by the big managed offerings.
const KUBERNETES_OLDEST: &str = "1.30.0";
/// The newest schema kubernetes-validate 1.37.0 ships.
const KUBERNETES_NEWEST: &str = "1.37.0";

fn resources() -> Vec<(String, Value)> {
    MANIFESTS
        .iter()
        .flat_map(|file| {
            yaml_documents(&format!("deploy/kubernetes/{file}"))
                .into_iter()
                .map(move |document| (file.to_string(), document))
        })
        .collect()
}

fn resource<'a>(resources: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    resources
        .iter()
        .map(|(_, resource)| resource)
        .find(|resource| resource["kind"] == kind && resource["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The pod templates of every workload, with the workload's kind and name.
fn workloads(resources: &[(String, Value)]) -> Vec<(String, String, &Value)> {
    resources
        .iter()
        .map(|(_, resource)| resource)
        .filter(|resource| ["Deployment", "StatefulSet", "Job"].contains(&resource["kind"].as_str().unwrap_or("")))
        .map(|resource| {
            (
                resource["kind"].as_str().unwrap_or("").to_owned(),
                resource["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                &resource["spec"],
            )
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|variable| variable["name"] == name)
}

fn env_text(container: &Value, name: &str) -> String {
    env_value(container, name)
        .and_then(|variable| variable["value"].as_str())
        .unwrap_or_else(|| panic!("container {} sets no {name}", container["name"]))
        .to_owned()
}

fn argument(container: &Value, flag: &str) -> Option<String> {
    strings(&container["args"])
        .iter()
        .find_map(|argument| argument.strip_prefix(&format!("{flag}=")).map(str::to_owned))
}

fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object().filter(|selector| !selector.is_empty()) else {
        return false;
    };
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// Every manifest passes Kubernetes' own JSON schemas, strictly (no unknown field), for the
/// oldest and newest versions the manifests target.
#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let validator = venv_tool("LOCKSTEP_KUBERNETES_VALIDATE", "bin/kubernetes-validate");
    for version in [KUBERNETES_OLDEST, KUBERNETES_NEWEST] {
        let output = Command::new(&validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(MANIFESTS)
            .current_dir(repo_root().join("deploy/kubernetes"))
            .output()
            .expect("run kubernetes-validate");
        assert!(
            output.status.success(),
            "kubernetes-validate {version}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The kustomization applies every manifest but the one-shot Job.
#[test]
fn the_kustomization_lists_the_manifests() {
    let kustomization = yaml_documents("deploy/kubernetes/kustomization.yaml").remove(0);
    let listed = strings(&kustomization["resources"]);
    let expected: Vec<&str> = MANIFESTS
        .iter()
        .copied()
        .filter(|file| *file != "create-tables-job.yaml")
        .collect();
    assert_eq!(listed, expected);
}

/// Every container runs a real binary with flags, commands and LOCKSTEP_* variables it has (or,
/// before the access-control work, the pending ones docs/deploy.md lists).
#[test]
fn every_flag_and_variable_exists() {
    let resources = resources();
    let mut checked = 0;
    for (kind, name, spec) in workloads(&resources) {
        for container in spec["template"]["spec"]["containers"].as_array().expect("containers") {
            let command = strings(&container["command"]);
            let binary = command
                .first()
                .and_then(|program| program.strip_prefix("/usr/local/bin/"))
                .unwrap_or_else(|| panic!("{kind} {name} does not name its binary in `command`"));
            let help = Help::of(binary);
            let variables: Vec<String> = container["env"]
                .as_array()
                .map(|env| {
                    env.iter()
                        .map(|variable| variable["name"].as_str().unwrap_or("").to_owned())
                        .collect()
                })
                .unwrap_or_default();
            let mut arguments = command[1..].to_vec();
            arguments.extend(strings(&container["args"]));
            assert_known_to(&help, &format!("{kind} {name}"), &arguments, &variables);
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "coordinator, user-service, order-service and create-tables");
}

/// The coordinator's --instance is its pod name, through the downward API, in a StatefulSet
/// (whose pod names survive rescheduling).
#[test]
fn the_instance_is_the_pod_name() {
    let resources = resources();
    let statefulset = resource(&resources, "StatefulSet", "lockstep-coordinator");
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let instance = env_value(container, "LOCKSTEP_INSTANCE").expect("LOCKSTEP_INSTANCE");
    assert_eq!(instance["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert!(
        Help::of("coordinator").option_by_env("LOCKSTEP_INSTANCE").is_some(),
        "the coordinator reads no LOCKSTEP_INSTANCE"
    );
}

/// Account affinity: each coordinator advertises its own pod's name through the StatefulSet's
/// headless governing Service, at the gRPC port, over https; peers authenticate with a token
/// and check the coordinators' CA, both from a mounted Secret.
#[test]
fn each_coordinator_advertises_its_pod_through_the_headless_service() {
    let resources = resources();
    let statefulset = resource(&resources, "StatefulSet", "lockstep-coordinator");
    let governing = statefulset["spec"]["serviceName"].as_str().expect("serviceName");
    let headless = resource(&resources, "Service", governing);
    assert_eq!(headless["spec"]["clusterIP"], "None", "{governing} is not headless");
    let namespace = statefulset["metadata"]["namespace"].as_str().expect("namespace");
    let pod = &statefulset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let port = port_of(&env_text(container, "LOCKSTEP_LISTEN"));
    assert_eq!(
        argument(container, "--advertise-address").as_deref(),
        Some(format!("https://$(LOCKSTEP_INSTANCE).{governing}.{namespace}.svc:{port}").as_str())
    );
    let mounted = |flag: &str| {
        let path = argument(container, flag).unwrap_or_else(|| panic!("no {flag}"));
        let mounts = container["volumeMounts"].as_array().expect("volume mounts");
        let mount = mounts
            .iter()
            .find(|mount| path.starts_with(mount["mountPath"].as_str().unwrap_or("-")))
            .unwrap_or_else(|| panic!("{flag} {path} is not under a mounted volume"));
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|volume| volume["name"] == mount["name"])
            .expect("the mount's volume");
        volume["secret"]["secretName"].as_str().expect("a Secret").to_owned()
    };
    assert_eq!(mounted("--peer-token-file"), "lockstep-coordinator-peer");
    assert_eq!(mounted("--peer-ca"), "lockstep-coordinator-peer");
}

/// Readiness asks the coordinator's named health service (storage), liveness and start-up ask
/// "" (the process), both through Kubernetes' gRPC probe on the health listener's port.
#[test]
fn coordinator_probes_ask_the_two_health_names() {
    let resources = resources();
    let statefulset = resource(&resources, "StatefulSet", "lockstep-coordinator");
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let health_port = port_of(&argument(container, "--health-listen").expect("--health-listen"));
    let named = lockstep_coordinator::server::SERVICE_NAME;
    for (probe, service) in [("readinessProbe", named), ("livenessProbe", ""), ("startupProbe", "")] {
        let grpc = &container[probe]["grpc"];
        assert!(grpc.is_object(), "{probe} is not a gRPC probe");
        assert_eq!(grpc["port"], health_port, "{probe} port");
        assert_eq!(grpc["service"], service, "{probe} health service name");
    }
    let ports: Vec<u64> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|port| port["containerPort"].as_u64().expect("a port"))
        .collect();
    let listen_port = port_of(&env_text(container, "LOCKSTEP_LISTEN"));
    assert_eq!(ports, [u64::from(listen_port), u64::from(health_port)]);
    assert_eq!(
        listen_port,
        port_of(Help::of("coordinator").default_of("--listen")),
        "not the default port"
    );
}

/// The HTTP services listen at their binary's default port on 0.0.0.0, are ready on GET /health
/// at that port, and call the coordinator at its Service's port.
#[test]
fn service_ports_and_probes_match_the_binaries() {
    let resources = resources();
    let coordinator_service = resource(&resources, "Service", "lockstep-coordinator");
    let coordinator_port = coordinator_service["spec"]["ports"][0]["port"]
        .as_u64()
        .expect("a port");
    for (name, variable) in [
        ("user-service", "LOCKSTEP_USER_SERVICE_LISTEN"),
        ("order-service", "LOCKSTEP_ORDER_SERVICE_LISTEN"),
    ] {
        let deployment = resource(&resources, "Deployment", &format!("lockstep-{name}"));
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let default_port = port_of(Help::of(name).default_of("--listen"));
        assert_eq!(env_text(container, variable), format!("0.0.0.0:{default_port}"));
        let port = &container["ports"][0];
        assert_eq!(port["containerPort"], default_port);
        let port_name = port["name"].as_str().expect("a named port");
        let readiness = &container["readinessProbe"]["httpGet"];
        assert_eq!(readiness["path"], "/health", "{name} readiness");
        assert_eq!(readiness["port"], port_name, "{name} readiness port");
        assert_eq!(
            container["livenessProbe"]["tcpSocket"]["port"], port_name,
            "{name} liveness"
        );
        let service = resource(&resources, "Service", &format!("lockstep-{name}"));
        assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);
        assert_eq!(
            env_text(container, "LOCKSTEP_COORDINATOR_URL"),
            format!("https://lockstep-coordinator.lockstep.svc:{coordinator_port}")
        );
    }
    let statefulset = resource(&resources, "StatefulSet", "lockstep-coordinator");
    assert_eq!(
        coordinator_service["spec"]["ports"][0]["targetPort"],
        statefulset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    );
}

/// Every pod runs as a non-root user with a read-only root, no privilege escalation, no
/// capabilities and the runtime's seccomp profile; every container has requests and limits, the
/// coordinator's memory limited to 128Mi.
#[test]
fn pods_are_locked_down_and_bounded() {
    let resources = resources();
    for (kind, name, spec) in workloads(&resources) {
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind} {name}");
        assert_ne!(pod["securityContext"]["runAsUser"], 0, "{kind} {name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{kind} {name}"
        );
        assert_eq!(
            pod["automountServiceAccountToken"],
            Value::Null,
            "set on the ServiceAccount"
        );
        for container in pod["containers"].as_array().expect("containers") {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{kind} {name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{kind} {name}");
            assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"], "{kind} {name}");
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        container["resources"][bound][resource].is_string(),
                        "{kind} {name} has no {bound}.{resource}"
                    );
                }
            }
        }
    }
    let statefulset = resource(&resources, "StatefulSet", "lockstep-coordinator");
    assert_eq!(
        statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"],
        "128Mi"
    );
}

/// Each PodDisruptionBudget selects the pods of exactly one workload (and lets one go at a
/// time), and each workload's selector and each Service's selector match its pods' labels.
#[test]
fn disruption_budgets_and_services_select_their_pods() {
    let resources = resources();
    let workloads = workloads(&resources);
    for (kind, name, spec) in &workloads {
        assert!(
            selects(
                &spec["selector"]["matchLabels"],
                &spec["template"]["metadata"]["labels"]
            ) || kind == "Job",
            "{kind} {name}: selector does not match its pod labels"
        );
    }
    let serving: Vec<&(String, String, &Value)> = workloads.iter().filter(|(kind, _, _)| kind != "Job").collect();
    let mut budgets = 0;
    for (_, resource) in &resources {
        let name = resource["metadata"]["name"].as_str().unwrap_or("");
        let namespace = &resource["metadata"]["namespace"];
        match resource["kind"].as_str() {
            Some("PodDisruptionBudget") => {
                let selector = &resource["spec"]["selector"]["matchLabels"];
                let selected: Vec<_> = serving
                    .iter()
                    .filter(|(_, _, spec)| selects(selector, &spec["template"]["metadata"]["labels"]))
                    .collect();
                assert_eq!(
                    selected.len(),
                    1,
                    "PodDisruptionBudget {name} selects {} workloads",
                    selected.len()
                );
                assert_eq!(
                    selected[0].1, name,
                    "PodDisruptionBudget {name} selects another workload"
                );
                assert_eq!(resource["spec"]["maxUnavailable"], 1, "PodDisruptionBudget {name}");
                budgets += 1;
            }
            Some("Service") => {
                let selector = &resource["spec"]["selector"];
                assert!(
                    serving
                        .iter()
                        .any(|(_, _, spec)| selects(selector, &spec["template"]["metadata"]["labels"])),
                    "Service {name} selects no pods"
                );
            }
            _ => {}
        }
        if resource["kind"] != "Namespace" {
            assert_eq!(namespace, "lockstep", "{name} is outside the lockstep namespace");
        }
    }
    assert_eq!(budgets, serving.len(), "a workload without a PodDisruptionBudget");
}

/// The Secrets the pods mount are the ones the manifests' headers and docs/deploy.md tell the
/// operator to create.
#[test]
fn mounted_secrets_are_documented() {
    let resources = resources();
    let guide = read("docs/deploy.md");
    for (kind, name, spec) in workloads(&resources) {
        for volume in spec["template"]["spec"]["volumes"].as_array().into_iter().flatten() {
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                assert!(
                    guide.contains(secret),
                    "{kind} {name} mounts Secret {secret}, which docs/deploy.md never names"
                );
            }
        }
    }
}
