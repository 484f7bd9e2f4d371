//! deploy/compose.yaml: the order of start-up, the flags and variables each container is given,
//! and the ports.

use serde_json::Value;

use crate::{Help, assert_known_to, port_of, yaml_documents};

fn compose() -> Value {
    let mut documents = yaml_documents("deploy/compose.yaml");
    assert_eq!(documents.len(), 1, "compose.yaml is one document");
    documents.remove(0)
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .pointer(&format!("/services/{name}"))
        .unwrap_or_else(|| panic!("compose.yaml has no service {name}"))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn environment(service: &Value) -> Vec<(String, String)> {
    service
        .get("environment")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .map(|(name, value)| {
                    let value = match value {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    };
                    (name.clone(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Each Lockstep container runs a real binary with flags, commands and LOCKSTEP_* variables that
/// binary has (or, before the access-control work, its pending `--insecure`).
#[test]
fn every_flag_and_variable_exists() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let mut checked = 0;
    for (name, service) in services {
        let command = strings(service.get("command"));
        let Some(binary) = command
            .first()
            .and_then(|program| program.strip_prefix("/usr/local/bin/"))
        else {
            continue;
        };
        if binary == "dynoxide" {
            continue;
        }
        let help = Help::of(binary);
        let variables: Vec<String> = environment(service).into_iter().map(|(name, _)| name).collect();
        assert_known_to(
            &help,
            &format!("compose.yaml service {name}"),
            &command[1..],
            &variables,
        );
        checked += 1;
    }
    assert_eq!(
        checked, 6,
        "create-tables, three coordinators, user-service and order-service"
    );
}

/// The table exists before the coordinator starts: storage healthy, then a one-shot
/// `coordinator create-tables` that must succeed, then `serve`, all on the same table.
#[test]
fn create_tables_runs_once_before_the_coordinator() {
    let compose = compose();
    let create = service(&compose, "create-tables");
    assert_eq!(
        strings(create.get("command")),
        ["/usr/local/bin/coordinator", "create-tables"]
    );
    assert_eq!(create["depends_on"]["dynamodb"]["condition"], "service_healthy");
    assert_eq!(create["restart"], "no");
    assert!(service(&compose, "dynamodb").get("healthcheck").is_some());
    for name in COORDINATORS {
        let coordinator = service(&compose, name);
        assert_eq!(
            coordinator["depends_on"]["create-tables"]["condition"], "service_completed_successfully",
            "{name}"
        );
        let storage = |service: &Value| -> Vec<(String, String)> {
            environment(service)
                .into_iter()
                .filter(|(name, _)| {
                    ["LOCKSTEP_DYNAMODB_ENDPOINT", "LOCKSTEP_TABLE", "LOCKSTEP_REGION"].contains(&name.as_str())
                })
                .collect()
        };
        assert_eq!(storage(create).len(), 3);
        assert_eq!(
            storage(create),
            storage(coordinator),
            "create-tables and {name} use other storage"
        );
        let endpoint = environment(coordinator)
            .into_iter()
            .find(|(name, _)| name == "LOCKSTEP_DYNAMODB_ENDPOINT")
            .map(|(_, value)| value)
            .expect("an endpoint");
        assert!(endpoint.starts_with("http://dynamodb:"), "{endpoint}");
    }
}

/// The coordinators of the demo, on one table.
const COORDINATORS: [&str; 3] = ["coordinator-1", "coordinator-2", "coordinator-3"];

/// Three coordinators with account affinity: each has its own stable --instance and advertises
/// its own service name at its listen port; all answer to the alias the services call.
#[test]
fn three_coordinators_advertise_themselves() {
    let compose = compose();
    let mut instances = std::collections::BTreeSet::new();
    for name in COORDINATORS {
        let coordinator = service(&compose, name);
        let environment: std::collections::BTreeMap<String, String> = environment(coordinator).into_iter().collect();
        let instance = environment.get("LOCKSTEP_INSTANCE").expect("LOCKSTEP_INSTANCE");
        assert!(
            instances.insert(instance.clone()),
            "{name} repeats --instance {instance}"
        );
        let port = port_of(&environment["LOCKSTEP_LISTEN"]);
        assert_eq!(
            environment.get("LOCKSTEP_ADVERTISE_ADDRESS").map(String::as_str),
            Some(format!("http://{name}:{port}").as_str()),
            "{name} advertises another address than its own"
        );
        assert_eq!(
            strings(coordinator["networks"]["default"].get("aliases")),
            ["coordinator"],
            "{name}"
        );
    }
}

/// Each process listens on 0.0.0.0 at its binary's default port, publishes it on the host's
/// loopback only, and the services reach the coordinator at its port.
#[test]
fn ports_match_the_binaries_defaults() {
    let compose = compose();
    let coordinator_port = port_of(Help::of("coordinator").default_of("--listen"));
    for (name, binary, variable) in [
        ("coordinator-1", "coordinator", "LOCKSTEP_LISTEN"),
        ("coordinator-2", "coordinator", "LOCKSTEP_LISTEN"),
        ("coordinator-3", "coordinator", "LOCKSTEP_LISTEN"),
        ("user-service", "user-service", "LOCKSTEP_USER_SERVICE_LISTEN"),
        ("order-service", "order-service", "LOCKSTEP_ORDER_SERVICE_LISTEN"),
    ] {
        let service = service(&compose, name);
        let default_port = port_of(Help::of(binary).default_of("--listen"));
        let environment = environment(service);
        let listen = environment
            .iter()
            .find(|(each, _)| each == variable)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("{name} sets no {variable}"));
        assert_eq!(listen, format!("0.0.0.0:{default_port}"), "{name} {variable}");
        // The first coordinator is the one grpcurl reaches from the host; the others only
        // through the alias and their peers.
        let published: Vec<String> = if matches!(name, "coordinator-2" | "coordinator-3") {
            Vec::new()
        } else {
            vec![format!("127.0.0.1:{default_port}:{default_port}")]
        };
        assert_eq!(
            strings(service.get("ports")),
            published,
            "{name} publishes other ports, or not on loopback only"
        );
        if binary != "coordinator" {
            let url = environment
                .iter()
                .find(|(each, _)| each == "LOCKSTEP_COORDINATOR_URL")
                .map(|(_, value)| value.as_str())
                .unwrap_or_else(|| panic!("{name} sets no LOCKSTEP_COORDINATOR_URL"));
            assert_eq!(url, format!("http://coordinator:{coordinator_port}"), "{name}");
        }
    }
}

/// Every Lockstep container has a read-only root file system and no capabilities.
#[test]
fn containers_are_read_only_without_capabilities() {
    let compose = compose();
    for (name, service) in compose["services"].as_object().expect("services") {
        assert_eq!(service["read_only"], true, "{name} has a writable root");
        assert_eq!(strings(service.get("cap_drop")), ["ALL"], "{name} keeps capabilities");
    }
}
