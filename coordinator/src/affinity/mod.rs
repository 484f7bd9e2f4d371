//! Account affinity (issue 19, docs/scale-out.md): at any moment each account has one owner
//! among the live coordinators of a table, so that the calls of one account meet in one process
//! and share its queue and batches.
//!
//! - this file: [`Membership`], the live coordinators as this one last read them, and the owner
//!   of an account by rendezvous hashing over them; [`keep_membership`], the loop that announces
//!   this coordinator and reads the others;
//! - [`forward`]: sending a mutation to its owner over gRPC (the `Peer` service), with the
//!   caller's deadline, principal and trace context, and falling back to serving it here.
//!
//! Affinity is only a way to be fast. The lease and the fenced commit still guard every write,
//! so two coordinators that disagree for a moment about the owner are both correct, only slower.

pub mod forward;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use sha2::{Digest, Sha256};

use crate::core::{Clock, UserId};
use crate::storage::model::{self, Member};
use crate::storage::{Storage, StorageError};
use forward::{Forwarder, PeerCredentials};

/// How long an announcement counts as live without renewal. A coordinator that dies stops
/// receiving forwards at most this long (plus one listing) after its last renewal; until then a
/// forward to it fails to connect and the call is served where it arrived.
pub const MEMBER_TTL: Duration = Duration::from_secs(2);
/// How often a coordinator renews its announcement and reads the others'.
pub const MEMBER_INTERVAL: Duration = Duration::from_millis(500);
/// How long past its expiry a dead run's announcement stays before a live coordinator removes it.
pub const MEMBER_FORGET_AFTER: Duration = Duration::from_secs(60);

const _: () = assert!(MEMBER_INTERVAL.as_millis() * 3 <= MEMBER_TTL.as_millis());

/// The affinity flags as given, with what they depend on.
#[derive(Debug, Clone, Default)]
pub struct AffinityFlags {
    /// `--advertise-address`: what peers dial to reach this coordinator; affinity is on with it.
    pub advertise_address: Option<String>,
    /// `--peer-token-file`: the bearer token this coordinator sends to its peers.
    pub peer_token_file: Option<PathBuf>,
    /// `--peer-ca`: the CA of the peers' server certificates (`https://` addresses).
    pub peer_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// Whether this coordinator serves TLS (then its peers dial https).
    pub tls: bool,
    /// Whether this coordinator authenticates its callers (then its peers do too).
    pub authenticated: bool,
    /// Whether the storage is the embedded engine, which one coordinator alone opens.
    pub embedded: bool,
}

/// Account affinity as configured: who is live, and the forwarder that uses it.
#[derive(Debug, Clone)]
pub struct Affinity {
    pub membership: Arc<Membership>,
    pub forwarder: Arc<Forwarder>,
}

impl Affinity {
    pub fn new(name: &str, address: &str, credentials: PeerCredentials) -> Self {
        let membership = Arc::new(Membership::new(name, address));
        Self {
            forwarder: Arc::new(Forwarder::new(Arc::clone(&membership), credentials)),
            membership,
        }
    }
}

/// What this coordinator advertises and how it authenticates to its peers, as the flags ask
/// (None without `--advertise-address`); a refusal names the flag and what is missing. Checked
/// before storage opens.
pub fn peer_setup(flags: &AffinityFlags) -> Result<Option<(String, PeerCredentials)>, String> {
    {
        let Some(address) = flags.advertise_address.as_deref() else {
            if flags.peer_token_file.is_some() || flags.peer_ca.is_some() {
                return Err("--peer-token-file and --peer-ca need --advertise-address".to_owned());
            }
            return Ok(None);
        };
        if flags.embedded {
            return Err(
                "--advertise-address: the embedded store serves one coordinator; affinity is for several on --storage dynamodb"
                    .to_owned(),
            );
        }
        let uri: tonic::codegen::http::Uri = address
            .parse()
            .map_err(|error| format!("--advertise-address {address:?}: {error}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "--advertise-address {address:?}: must start with http:// or https://"
                ));
            }
        };
        if uri.host().is_none_or(str::is_empty) || uri.path() != "/" {
            return Err(format!(
                "--advertise-address {address:?}: must be scheme://host:port, nothing after"
            ));
        }
        if https != flags.tls {
            return Err(if flags.tls {
                format!("--advertise-address {address:?}: this coordinator serves TLS (--tls-cert); advertise https://")
            } else {
                format!(
                    "--advertise-address {address:?}: this coordinator serves plaintext (no --tls-cert); advertise http://"
                )
            });
        }
        let read = |path: &PathBuf| std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()));
        let tls = match (&flags.peer_ca, https) {
            (Some(ca), true) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
                if let (Some(_), Some(cert), Some(key)) = (&flags.tls_client_ca, &flags.tls_cert, &flags.tls_key) {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                Some(tls)
            }
            (None, true) => {
                return Err(
                    "--advertise-address https://…: add --peer-ca, the CA of the peers' certificates".to_owned(),
                );
            }
            (Some(_), false) => return Err("--peer-ca is for an https:// --advertise-address".to_owned()),
            (None, false) => None,
        };
        let authorization = match &flags.peer_token_file {
            Some(path) => {
                let text = String::from_utf8(read(path)?).map_err(|_| format!("{}: not UTF-8", path.display()))?;
                let token = crate::auth::tokens::token_from_input(&text)
                    .map_err(|error| format!("{}: {error}", path.display()))?;
                let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
                    .parse()
                    .map_err(|_| format!("{}: the token is not valid in a header", path.display()))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let certificate_peers = https && flags.tls_client_ca.is_some();
        if flags.authenticated && authorization.is_none() && !certificate_peers {
            return Err("--advertise-address with authentication on: peers must prove who they are; add --peer-token-file (a token whose --auth-file line has the peer role), or serve https with --tls-client-ca".to_owned());
        }
        Ok(Some((address.to_owned(), PeerCredentials { authorization, tls })))
    }
}

/// A coordinator other accounts may be forwarded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: Arc<str>,
    pub address: Arc<str>,
}

/// Who serves an account's mutations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This coordinator.
    Me,
    Peer(Peer),
}

/// The live coordinators of the table as this one last read them, itself always among them.
#[derive(Debug)]
pub struct Membership {
    me: Peer,
    /// Everyone live, this coordinator included, sorted by name.
    live: RwLock<Arc<Vec<Peer>>>,
}

impl Membership {
    pub fn new(name: &str, address: &str) -> Self {
        let me = Peer {
            name: name.into(),
            address: address.into(),
        };
        Self {
            live: RwLock::new(Arc::new(vec![me.clone()])),
            me,
        }
    }

    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// The live coordinators, this one included, sorted by name.
    pub fn live(&self) -> Arc<Vec<Peer>> {
        Arc::clone(&self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Replaces the live set with `members` (this coordinator is added if missing: it is live,
    /// whatever storage last said).
    pub fn set_live(&self, members: impl IntoIterator<Item = Peer>) {
        let mut live: Vec<Peer> = members.into_iter().filter(|peer| peer.name != self.me.name).collect();
        live.push(self.me.clone());
        live.sort_by(|a, b| a.name.cmp(&b.name));
        *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(live);
    }

    /// The owner of `account`: the live coordinator with the highest rendezvous score.
    pub fn owner_of(&self, account: &UserId) -> Owner {
        let live = self.live();
        let owner = rendezvous_owner(&live, account.as_str()).expect("this coordinator is always live");
        if owner.name == self.me.name {
            Owner::Me
        } else {
            Owner::Peer(owner.clone())
        }
    }
}

/// The member with the highest `score(member, account)` (rendezvous, or highest-random-weight,
/// hashing): every coordinator with the same member list names the same owner, and a member that
/// joins or leaves moves only the accounts it wins or held, about 1/n of them.
pub fn rendezvous_owner<'a>(members: &'a [Peer], account: &str) -> Option<&'a Peer> {
    members.iter().max_by(|a, b| {
        score(&a.name, account)
            .cmp(&score(&b.name, account))
            .then(b.name.cmp(&a.name))
    })
}

/// A stable 64-bit score of (member, account): SHA-256, so every build and platform agrees.
fn score(member: &str, account: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(member.as_bytes())
        .chain_update([0xff])
        .chain_update(account.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// Announces this coordinator every `MEMBER_INTERVAL` and reads who else is live into
/// `membership`, until aborted. Storage errors are logged and the last list kept: the list only
/// steers calls, it never decides a write.
pub async fn keep_membership(
    storage: Storage,
    clock: Arc<dyn Clock>,
    membership: Arc<Membership>,
    incarnation: String,
) {
    let mut interval = tokio::time::interval(MEMBER_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = clock.now();
        let announcement = Member {
            name: membership.me.name.to_string(),
            address: membership.me.address.to_string(),
            incarnation: incarnation.clone(),
            expires_at: now + MEMBER_TTL.as_millis() as u64,
        };
        if let Err(error) = storage.put(model::put_member(&announcement)).await {
            tracing::warn!(%error, "could not renew this coordinator's membership announcement");
        }
        match read_members(&storage).await {
            Ok(members) => {
                let before = membership.live();
                let forget_before = now.saturating_sub(MEMBER_FORGET_AFTER.as_millis() as u64);
                for dead in members.iter().filter(|member| member.expires_at <= forget_before) {
                    // Best effort: another coordinator may remove it first, or it may renew.
                    storage
                        .delete(model::delete_expired_member(&dead.name, forget_before))
                        .await
                        .ok();
                }
                membership.set_live(
                    members
                        .into_iter()
                        .filter(|member| member.expires_at > now)
                        .map(|member| Peer {
                            name: member.name.into(),
                            address: member.address.into(),
                        }),
                );
                let after = membership.live();
                crate::telemetry::metrics::live_coordinators(after.len());
                if before != after {
                    let names: Vec<&str> = after.iter().map(|peer| &*peer.name).collect();
                    tracing::info!(members = ?names, "live coordinators changed");
                }
            }
            Err(error) => tracing::warn!(%error, "could not read the live coordinators; keeping the last list"),
        }
    }
}

/// The coordinators whose announcements are live at `now` (affinity: every one that advertises
/// an address), sorted by name.
pub async fn live_members(storage: &Storage, now: crate::core::Millis) -> Result<Vec<Peer>, StorageError> {
    let mut live: Vec<Peer> = read_members(storage)
        .await?
        .into_iter()
        .filter(|member| member.expires_at > now)
        .map(|member| Peer {
            name: member.name.into(),
            address: member.address.into(),
        })
        .collect();
    live.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(live)
}

/// Every announcement in the table, live or not.
async fn read_members(storage: &Storage) -> Result<Vec<Member>, StorageError> {
    let mut members = Vec::new();
    let mut start_after = None;
    loop {
        let page = storage.query(model::members_query(start_after)).await?;
        members.extend(page.items.iter().filter_map(model::member_from_item));
        match page.last_key {
            Some(key) => start_after = Some(key),
            None => return Ok(members),
        }
    }
}

/// Removes this coordinator's announcement (on drain), so that peers stop forwarding to it
/// within one listing instead of one TTL.
pub async fn leave(storage: &Storage, membership: &Membership, incarnation: &str) {
    if let Err(error) = storage
        .delete(model::delete_member(&membership.me.name, incarnation))
        .await
        && !matches!(error, StorageError::ConditionFailed { .. })
    {
        tracing::warn!(%error, "could not remove this coordinator's membership announcement");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(names: &[&str]) -> Vec<Peer> {
        names
            .iter()
            .map(|name| Peer {
                name: (*name).into(),
                address: format!("http://{name}:50051").into(),
            })
            .collect()
    }

    /// Every coordinator with the same list names the same owner, whatever order it holds
    /// the list in; owners spread over the members.
    #[test]
    fn every_list_order_names_the_same_owner_and_owners_spread() {
        let forward = peers(&["a", "b", "c"]);
        let backward = peers(&["c", "b", "a"]);
        let mut counts = std::collections::BTreeMap::new();
        for index in 0..3000 {
            let account = format!("user-{index}");
            let owner = rendezvous_owner(&forward, &account).unwrap();
            assert_eq!(owner, rendezvous_owner(&backward, &account).unwrap());
            *counts.entry(owner.name.clone()).or_insert(0) += 1;
        }
        for (name, count) in &counts {
            assert!((800..=1200).contains(count), "{name} owns {count} of 3000 accounts");
        }
    }

    /// A member that leaves moves only its own accounts; one that joins takes only accounts
    /// (about 1/n of them), never moving any between the others.
    #[test]
    fn a_member_joining_or_leaving_moves_only_its_share() {
        let three = peers(&["a", "b", "c"]);
        let four = peers(&["a", "b", "c", "d"]);
        let mut moved = 0;
        for index in 0..4000 {
            let account = format!("user-{index}");
            let before = rendezvous_owner(&three, &account).unwrap();
            let after = rendezvous_owner(&four, &account).unwrap();
            if before != after {
                assert_eq!(&*after.name, "d", "{account} moved between old members");
                moved += 1;
            }
        }
        assert!(
            (800..=1200).contains(&moved),
            "{moved} of 4000 accounts moved to the new member"
        );
    }

    fn flags(address: &str) -> AffinityFlags {
        AffinityFlags {
            advertise_address: Some(address.to_owned()),
            ..AffinityFlags::default()
        }
    }

    /// Each careless setting is refused at start with the flag it concerns and what to do.
    #[test]
    fn careless_affinity_settings_are_refused_naming_the_flag() {
        let refused = |flags: AffinityFlags| peer_setup(&flags).expect_err("refused");
        assert!(peer_setup(&AffinityFlags::default()).unwrap().is_none());
        assert!(
            peer_setup(&flags("http://coordinator-0.peers:50051"))
                .unwrap()
                .is_some()
        );
        for address in ["coordinator-0:50051", "ftp://host:1", "http://host:1/path", "http://"] {
            let error = refused(flags(address));
            assert!(error.starts_with("--advertise-address"), "{address}: {error}");
        }
        let error = refused(AffinityFlags {
            tls: true,
            ..flags("https://host:50051")
        });
        assert!(error.contains("--peer-ca"), "{error}");
        let error = refused(AffinityFlags {
            tls: true,
            ..flags("http://host:50051")
        });
        assert!(error.contains("advertise https://"), "{error}");
        let error = refused(flags("https://host:50051"));
        assert!(error.contains("advertise http://"), "{error}");
        let error = refused(AffinityFlags {
            embedded: true,
            ..flags("http://host:1")
        });
        assert!(error.contains("embedded"), "{error}");
        let error = refused(AffinityFlags {
            authenticated: true,
            ..flags("http://host:1")
        });
        assert!(error.contains("--peer-token-file"), "{error}");
        let error = refused(AffinityFlags {
            peer_token_file: Some("token".into()),
            ..AffinityFlags::default()
        });
        assert!(error.contains("need --advertise-address"), "{error}");
        let short = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short.path(), "short\n").unwrap();
        let error = refused(AffinityFlags {
            authenticated: true,
            peer_token_file: Some(short.path().to_owned()),
            ..flags("http://host:1")
        });
        assert!(error.contains("a token must be"), "{error}");
    }

    /// This coordinator is always live, even when storage's list does not have it yet.
    #[test]
    fn this_coordinator_is_always_in_the_live_list() {
        let membership = Membership::new("b", "http://b:50051");
        membership.set_live(peers(&["a", "c"]));
        let names: Vec<String> = membership.live().iter().map(|peer| peer.name.to_string()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        membership.set_live(Vec::new());
        let user = UserId::parse("user_id", "alice").unwrap();
        assert_eq!(membership.owner_of(&user), Owner::Me);
    }
}
