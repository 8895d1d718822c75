//! Apply rules for the cluster record and the keyring keys.

use crate::command::{
    CreateJoinToken, InitCluster, JoinTokenRecord, JoinTokenRefusal, Outcome, Rejection, UseJoinToken,
};
use crate::error::StoreError;
use crate::state::Txn;
use crate::store::{cf, keyring_key, CLUSTER_KEY};
use crate::ClusterRecord;

/// Records the cluster and its first keyring key, once.
pub(crate) fn init(txn: &mut Txn<'_>, init: &InitCluster) -> Result<Outcome, StoreError> {
    if txn.get::<ClusterRecord>(cf::CLUSTER, CLUSTER_KEY, "cluster record")?.is_some() {
        return Ok(Outcome::Rejected(Rejection::AlreadyInitialized));
    }
    txn.put(cf::CLUSTER, CLUSTER_KEY.to_vec(), &init.cluster);
    txn.put(cf::CLUSTER, keyring_key(init.keyring.version), &init.keyring);
    Ok(Outcome::Applied)
}

fn join_token_key(hash: &crate::TokenHash) -> Vec<u8> {
    let mut key = b"join-token/".to_vec();
    key.extend_from_slice(&hash.0);
    key
}

/// Records a join token's hash and expiry.
pub(crate) fn create_join_token(txn: &mut Txn<'_>, create: &CreateJoinToken) -> Result<Outcome, StoreError> {
    let record =
        JoinTokenRecord { created_at_ms: create.created_at_ms, expires_at_ms: create.expires_at_ms, used_by: None };
    txn.put(cf::CLUSTER, join_token_key(&create.hash), &record);
    Ok(Outcome::Applied)
}

/// Spends a join token on a node, if it exists, is unspent and has not expired at the leader's
/// time. Spending it again for the same node (a join retried after its answer was lost) applies.
pub(crate) fn use_join_token(txn: &mut Txn<'_>, spend: &UseJoinToken) -> Result<Outcome, StoreError> {
    let key = join_token_key(&spend.hash);
    let refused = |r| Ok(Outcome::Rejected(Rejection::JoinToken(r)));
    let Some(mut record) = txn.get::<JoinTokenRecord>(cf::CLUSTER, &key, "join token")? else {
        return refused(JoinTokenRefusal::Unknown);
    };
    // Expiry first: a node's own retry is let through only while the token lives, so a node
    // removed later cannot rejoin with the token it joined with.
    if spend.at_ms >= record.expires_at_ms {
        return refused(JoinTokenRefusal::Expired { expired_at_ms: record.expires_at_ms });
    }
    match record.used_by {
        Some(by) if by == spend.node => return Ok(Outcome::Applied),
        Some(by) => return refused(JoinTokenRefusal::Used { by }),
        None => {}
    }
    record.used_by = Some(spend.node);
    txn.put(cf::CLUSTER, key, &record);
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;
    use crate::state::testing::Scratch;
    use crate::{KeyringRecord, KeyringVersion, UnixMillis};

    #[test]
    fn the_cluster_is_initialised_once() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let init = |id: &str| {
            Op::InitCluster(InitCluster {
                cluster: ClusterRecord { cluster_id: id.into(), root_kcv: "00".into(), created_at_ms: UnixMillis(1) },
                keyring: KeyringRecord {
                    version: KeyringVersion(1),
                    wrapped: vec![1; 40],
                    created_at_ms: UnixMillis(1),
                },
            })
        };
        let outcomes = s.apply_ops(vec![init("c1"), init("c2")])?;
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Rejected(Rejection::AlreadyInitialized)]);
        assert_eq!(s.reader().cluster()?.map(|c| c.cluster_id), Some("c1".into()), "the second changed nothing");
        assert_eq!(s.reader().keyrings()?.len(), 1);
        Ok(())
    }

    #[test]
    fn a_join_token_admits_one_node_once_before_it_expires() -> Result<(), StoreError> {
        use crate::NodeId;
        let s = Scratch::must_new();
        let token = |hash: u8| {
            Op::CreateJoinToken(CreateJoinToken {
                hash: crate::TokenHash([hash; 32]),
                created_at_ms: UnixMillis(1_000),
                expires_at_ms: UnixMillis(2_000),
            })
        };
        let spend = |hash: u8, node: u64, at: u64| {
            Op::UseJoinToken(UseJoinToken {
                hash: crate::TokenHash([hash; 32]),
                node: NodeId(node),
                at_ms: UnixMillis(at),
            })
        };
        let refused = |r| Outcome::Rejected(Rejection::JoinToken(r));
        let r = s.apply_ops(vec![
            token(1),
            token(2),
            spend(9, 4, 1_500),
            spend(1, 4, 1_500),
            spend(1, 4, 1_600),
            spend(1, 5, 1_600),
            spend(2, 5, 2_000),
            spend(1, 4, 2_000),
        ])?;
        assert_eq!(
            r,
            vec![
                Outcome::Applied,
                Outcome::Applied,
                refused(JoinTokenRefusal::Unknown),
                Outcome::Applied,
                Outcome::Applied,
                refused(JoinTokenRefusal::Used { by: NodeId(4) }),
                refused(JoinTokenRefusal::Expired { expired_at_ms: UnixMillis(2_000) }),
                refused(JoinTokenRefusal::Expired { expired_at_ms: UnixMillis(2_000) }),
            ],
            "unknown, spent by node 4 (again: its retry), refused to node 5, expired, and expired for node 4 too"
        );
        Ok(())
    }
}
