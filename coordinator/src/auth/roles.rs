//! Who may call what: the role table, data-driven by gRPC path.

use std::fmt;

/// A role granted to a principal in the auth file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The four mutations and every read, for any user: the role of user-service and
    /// order-service.
    Trader,
    /// Reads only.
    Reader,
    /// UpsertAsset and the admin service.
    Admin,
    /// Another coordinator of the same table: `Peer/Forward`, which serves a mutation in the
    /// name of the principal the forwarding coordinator authenticated, and `Peer/ForwardWatch`
    /// (a WatchLedger stream at the account's owner), only.
    Peer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Trader, Role::Reader, Role::Admin, Role::Peer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Trader => "trader",
            Role::Reader => "reader",
            Role::Admin => "admin",
            Role::Peer => "peer",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Role::ALL.into_iter().find(|role| role.as_str() == raw)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a gRPC path requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials at all: health probes.
    Open,
    /// Any authenticated principal, whatever its roles: reflection.
    Authenticated,
    /// A principal holding at least one of these roles.
    AnyOf(&'static [Role]),
}

const MUTATE: Access = Access::AnyOf(&[Role::Trader]);
const READ: Access = Access::AnyOf(&[Role::Trader, Role::Reader]);
const ADMIN: Access = Access::AnyOf(&[Role::Admin]);
const PEER: Access = Access::AnyOf(&[Role::Peer]);

/// The role table: a path, or a prefix ending in `/` that covers a whole service. The first
/// match wins. A path that matches nothing is refused to everyone (default deny): a new RPC
/// must be added here before anyone can call it, and a test checks that every RPC of the
/// proto files is.
pub const RULES: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/", Access::Open),
    ("/grpc.reflection.v1.ServerReflection/", Access::Authenticated),
    ("/grpc.reflection.v1alpha.ServerReflection/", Access::Authenticated),
    ("/lockstep.coordinator.v1.Coordinator/Deposit", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/Withdraw", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/PlaceBuy", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/PlaceSell", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/Transfer", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/SettleWithdrawal", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/ReturnWithdrawal", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/ReserveOrder", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/FillOrder", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/CancelOrder", MUTATE),
    ("/lockstep.coordinator.v1.Coordinator/GetAccount", READ),
    ("/lockstep.coordinator.v1.Coordinator/GetOrder", READ),
    ("/lockstep.coordinator.v1.Coordinator/ListOrders", READ),
    ("/lockstep.coordinator.v1.Coordinator/ListLedger", READ),
    ("/lockstep.coordinator.v1.Coordinator/WatchLedger", READ),
    ("/lockstep.coordinator.v1.Coordinator/WatchFeed", READ),
    ("/lockstep.coordinator.v1.Coordinator/ListAssets", READ),
    ("/lockstep.coordinator.v1.Coordinator/ListAssetChanges", READ),
    ("/lockstep.coordinator.v1.Coordinator/UpsertAsset", ADMIN),
    ("/lockstep.coordinator.v1.Admin/", ADMIN),
    ("/lockstep.coordinator.v1.Peer/Forward", PEER),
    ("/lockstep.coordinator.v1.Peer/ForwardWatch", PEER),
];

/// What `path` requires; None when the table does not name it (nobody may call it).
pub fn access_of(path: &str) -> Option<Access> {
    RULES.iter().find_map(|(pattern, access)| {
        let matches = if pattern.ends_with('/') {
            path.starts_with(pattern) && path.len() > pattern.len()
        } else {
            path == *pattern
        };
        matches.then_some(*access)
    })
}

/// The roles in `needed` as a message names them: `trader`, `trader or reader`.
pub fn describe(needed: &[Role]) -> String {
    needed.iter().map(|role| role.as_str()).collect::<Vec<_>>().join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const COORDINATOR: &str = "/lockstep.coordinator.v1.Coordinator/";

    /// Mutations need trader, reads trader or reader, UpsertAsset and the Admin service admin.
    #[test]
    fn the_table_names_the_roles_of_the_issue() {
        let roles = |path: &str| match access_of(path) {
            Some(Access::AnyOf(roles)) => roles.to_vec(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(roles(&format!("{COORDINATOR}Deposit")), vec![Role::Trader]);
        assert_eq!(
            roles(&format!("{COORDINATOR}GetAccount")),
            vec![Role::Trader, Role::Reader]
        );
        assert_eq!(roles(&format!("{COORDINATOR}UpsertAsset")), vec![Role::Admin]);
        assert_eq!(roles("/lockstep.coordinator.v1.Admin/Drain"), vec![Role::Admin]);
        assert_eq!(roles("/lockstep.coordinator.v1.Peer/Forward"), vec![Role::Peer]);
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Some(Access::Open));
        assert_eq!(
            access_of("/grpc.health.v1.Health/"),
            None,
            "a prefix alone is no method"
        );
        assert_eq!(access_of(&format!("{COORDINATOR}Unknown")), None);
        assert_eq!(access_of(&format!("{COORDINATOR}DepositX")), None);
    }

    /// Every method of every service the coordinator serves has a rule: an RPC added to a proto
    /// file without one would be refused to everyone.
    #[test]
    fn every_served_method_has_a_rule() {
        use prost::Message;
        for encoded in [lockstep::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let set = prost_types::FileDescriptorSet::decode(encoded).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        assert!(access_of(&path).is_some(), "{path} has no rule");
                    }
                }
            }
        }
        for path in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(access_of(path), Some(Access::Authenticated));
        }
    }
}
