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
    assert_eq!(checked, 4, "create-tables, coordinator, user-service and order-service");
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
    let coordinator = service(&compose, "coordinator");
    assert_eq!(
        coordinator["depends_on"]["create-tables"]["condition"],
        "service_completed_successfully"
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
        "create-tables and serve use other storage"
    );
    let endpoint = environment(coordinator)
        .into_iter()
        .find(|(name, _)| name == "LOCKSTEP_DYNAMODB_ENDPOINT")
        .map(|(_, value)| value)
        .expect("an endpoint");
    assert!(endpoint.starts_with("http://dynamodb:"), "{endpoint}");
    let named_instance = environment(coordinator)
        .into_iter()
        .any(|(name, value)| name == "LOCKSTEP_INSTANCE" && !value.is_empty());
    assert!(named_instance, "the coordinator has no stable --instance");
}

/// Each process listens on 0.0.0.0 at its binary's default port, publishes it on the host's
/// loopback only, and the services reach the coordinator at its port.
#[test]
fn ports_match_the_binaries_defaults() {
    let compose = compose();
    let coordinator_port = port_of(Help::of("coordinator").default_of("--listen"));
    for (name, variable) in [
        ("coordinator", "LOCKSTEP_LISTEN"),
        ("user-service", "LOCKSTEP_USER_SERVICE_LISTEN"),
        ("order-service", "LOCKSTEP_ORDER_SERVICE_LISTEN"),
    ] {
        let service = service(&compose, name);
        let default_port = port_of(Help::of(name).default_of("--listen"));
        let environment = environment(service);
        let listen = environment
            .iter()
            .find(|(each, _)| each == variable)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("{name} sets no {variable}"));
        assert_eq!(listen, format!("0.0.0.0:{default_port}"), "{name} {variable}");
        assert_eq!(
            strings(service.get("ports")),
            [format!("127.0.0.1:{default_port}:{default_port}")],
            "{name} publishes other ports, or not on loopback only"
        );
        if name != "coordinator" {
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
