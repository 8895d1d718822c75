//! Apply rules for the cluster record and the keyring keys.

use crate::command::{InitCluster, Outcome, Rejection};
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
}
