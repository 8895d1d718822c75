//! Apply rules for tokens, policies and certificate login roles (column family `identity`).
//!
//! Keys:
//! - `key` → the sealed token-hashing key
//! - `token/<hash>` → [`TokenRecord`]; `accessor/<accessor>` → hash
//! - `child/<parent hash><child hash>` → () (what a revocation walks)
//! - `expiry/<u64 BE ms><hash>` → () (what the leader's sweep reads, in due order)
//! - `policy/<name>` → [`PolicyRecord`]; `role/<name>` → [`CertRoleRecord`]
//!
//! # Correctness
//! - A token is created only under a live parent; revoking a token removes it and everything
//!   below it from every index in the same batch, so no node can see a child outlive its parent.
//! - Expiry uses the proposer's `at_ms`, never a clock here; every node also checks expiry on
//!   each call, so access never waits on the sweep.

use crate::command::{Outcome, Rejection};
use crate::error::StoreError;
use crate::identity::{
    CertRoleRecord, CreateToken, DeleteCertRole, DeletePolicy, ExpireTokens, IdentityKeyRecord,
    InitClusterWithIdentity, PolicyRecord, PutCertRole, PutPolicy, RenewToken, RevokeToken, TokenRecord,
};
use crate::state::Txn;
use crate::store::{cf, CLUSTER_KEY};
use crate::{ClusterRecord, TokenHash};

pub(crate) const KEY: &[u8] = b"key";
pub(crate) const TOKEN: &[u8] = b"token/";
pub(crate) const ACCESSOR: &[u8] = b"accessor/";
pub(crate) const CHILD: &[u8] = b"child/";
pub(crate) const EXPIRY: &[u8] = b"expiry/";
pub(crate) const POLICY: &[u8] = b"policy/";
pub(crate) const ROLE: &[u8] = b"role/";

pub(crate) fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

fn expiry_key(at: crate::UnixMillis, hash: &TokenHash) -> Vec<u8> {
    let mut k = key(EXPIRY, &at.0.to_be_bytes());
    k.extend_from_slice(&hash.0);
    k
}

fn child_key(parent: &TokenHash, child: &TokenHash) -> Vec<u8> {
    let mut k = key(CHILD, &parent.0);
    k.extend_from_slice(&child.0);
    k
}

fn rejected(r: Rejection) -> Result<Outcome, StoreError> {
    Ok(Outcome::Rejected(r))
}

/// Records the cluster, the hashing key and the root token together, once. Every check comes
/// before the first write: a rejection writes nothing.
pub(crate) fn init_with_identity(txn: &mut Txn<'_>, i: &InitClusterWithIdentity) -> Result<Outcome, StoreError> {
    let root = &i.identity.root;
    let taken = txn.get::<ClusterRecord>(cf::CLUSTER, CLUSTER_KEY, "cluster record")?.is_some()
        || txn.get::<IdentityKeyRecord>(cf::IDENTITY, KEY, "identity key")?.is_some()
        || txn.get::<TokenRecord>(cf::IDENTITY, &key(TOKEN, &root.hash.0), "token")?.is_some()
        || txn.get::<TokenHash>(cf::IDENTITY, &key(ACCESSOR, root.record.accessor.as_bytes()), "accessor")?.is_some();
    if taken {
        return rejected(Rejection::AlreadyInitialized);
    }
    if root.record.parent.is_some() {
        return rejected(Rejection::TokenNotFound);
    }
    let outcome = crate::state::cluster::init(txn, &i.cluster)?;
    if outcome != Outcome::Applied {
        return Ok(outcome);
    }
    txn.put(cf::IDENTITY, KEY.to_vec(), &i.identity.key);
    create_token(txn, root)
}

/// Creates a token under a live parent (or none).
pub(crate) fn create_token(txn: &mut Txn<'_>, c: &CreateToken) -> Result<Outcome, StoreError> {
    let token_key = key(TOKEN, &c.hash.0);
    if txn.get::<TokenRecord>(cf::IDENTITY, &token_key, "token")?.is_some() {
        return rejected(Rejection::TokenExists);
    }
    if txn.get::<TokenHash>(cf::IDENTITY, &key(ACCESSOR, c.record.accessor.as_bytes()), "accessor")?.is_some() {
        return rejected(Rejection::TokenExists);
    }
    if let Some(parent) = &c.record.parent {
        let live = txn
            .get::<TokenRecord>(cf::IDENTITY, &key(TOKEN, &parent.0), "token")?
            .is_some_and(|p| p.expires_at_ms.is_none_or(|e| c.record.created_at_ms < e));
        if !live {
            return rejected(Rejection::TokenNotFound);
        }
        txn.put(cf::IDENTITY, child_key(parent, &c.hash), &());
    }
    if let Some(at) = c.record.expires_at_ms {
        txn.put(cf::IDENTITY, expiry_key(at, &c.hash), &());
    }
    txn.put(cf::IDENTITY, key(ACCESSOR, c.record.accessor.as_bytes()), &c.hash);
    txn.put(cf::IDENTITY, token_key, &c.record);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

/// Moves a live, renewable token's expiry forward, within its maximum.
pub(crate) fn renew_token(txn: &mut Txn<'_>, r: &RenewToken) -> Result<Outcome, StoreError> {
    let token_key = key(TOKEN, &r.hash.0);
    let Some(mut record) = txn.get::<TokenRecord>(cf::IDENTITY, &token_key, "token")? else {
        return rejected(Rejection::TokenNotFound);
    };
    let Some(old) = record.expires_at_ms else {
        return rejected(Rejection::TokenNotRenewable);
    };
    if old <= r.at_ms {
        return rejected(Rejection::TokenNotFound);
    }
    if !record.renewable || record.max_expires_at_ms.is_some_and(|max| r.expires_at_ms > max) {
        return rejected(Rejection::TokenNotRenewable);
    }
    txn.delete(cf::IDENTITY, expiry_key(old, &r.hash));
    txn.put(cf::IDENTITY, expiry_key(r.expires_at_ms, &r.hash), &());
    record.expires_at_ms = Some(r.expires_at_ms);
    txn.put(cf::IDENTITY, token_key, &record);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

/// Revokes a token and its descendants. A token already gone applies (a retried revoke).
pub(crate) fn revoke_token(txn: &mut Txn<'_>, r: &RevokeToken) -> Result<Outcome, StoreError> {
    remove_tree(txn, &r.hash)?;
    Ok(Outcome::Applied)
}

/// Revokes each listed token that has expired by the sweep's time.
pub(crate) fn expire_tokens(txn: &mut Txn<'_>, e: &ExpireTokens) -> Result<Outcome, StoreError> {
    for hash in &e.hashes {
        let record = txn.get::<TokenRecord>(cf::IDENTITY, &key(TOKEN, &hash.0), "token")?;
        if record.and_then(|r| r.expires_at_ms).is_some_and(|at| at <= e.at_ms) {
            remove_tree(txn, hash)?;
        }
    }
    Ok(Outcome::Applied)
}

/// Removes `root` and every token below it from every index. Iterative: a deep chain of child
/// tokens cannot exhaust the stack.
fn remove_tree(txn: &mut Txn<'_>, root: &TokenHash) -> Result<(), StoreError> {
    let mut pending = vec![root.clone()];
    while let Some(hash) = pending.pop() {
        let token_key = key(TOKEN, &hash.0);
        let Some(record) = txn.get::<TokenRecord>(cf::IDENTITY, &token_key, "token")? else { continue };
        for child in txn.keys_with_prefix(cf::IDENTITY, &key(CHILD, &hash.0))? {
            if let Some(tail) = child.get(CHILD.len() + 32..) {
                if let Ok(bytes) = <[u8; 32]>::try_from(tail) {
                    pending.push(TokenHash(bytes));
                }
            }
            txn.delete(cf::IDENTITY, child);
        }
        if let Some(parent) = &record.parent {
            txn.delete(cf::IDENTITY, child_key(parent, &hash));
        }
        if let Some(at) = record.expires_at_ms {
            txn.delete(cf::IDENTITY, expiry_key(at, &hash));
        }
        txn.delete(cf::IDENTITY, key(ACCESSOR, record.accessor.as_bytes()));
        txn.delete(cf::IDENTITY, token_key);
        txn.identity_changed = true;
    }
    Ok(())
}

/// Writes a policy (the node parsed and checked the document).
pub(crate) fn put_policy(txn: &mut Txn<'_>, p: &PutPolicy) -> Result<Outcome, StoreError> {
    txn.put(cf::IDENTITY, key(POLICY, p.record.name.as_bytes()), &p.record);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

/// Deletes a policy.
pub(crate) fn delete_policy(txn: &mut Txn<'_>, d: &DeletePolicy) -> Result<Outcome, StoreError> {
    let k = key(POLICY, d.name.as_bytes());
    if txn.get::<PolicyRecord>(cf::IDENTITY, &k, "policy")?.is_none() {
        return rejected(Rejection::PolicyNotFound { name: d.name.clone() });
    }
    txn.delete(cf::IDENTITY, k);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

/// Writes a certificate login role.
pub(crate) fn put_role(txn: &mut Txn<'_>, p: &PutCertRole) -> Result<Outcome, StoreError> {
    txn.put(cf::IDENTITY, key(ROLE, p.record.name.as_bytes()), &p.record);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

/// Deletes a certificate login role.
pub(crate) fn delete_role(txn: &mut Txn<'_>, d: &DeleteCertRole) -> Result<Outcome, StoreError> {
    let k = key(ROLE, d.name.as_bytes());
    if txn.get::<CertRoleRecord>(cf::IDENTITY, &k, "role")?.is_none() {
        return rejected(Rejection::RoleNotFound { name: d.name.clone() });
    }
    txn.delete(cf::IDENTITY, k);
    txn.identity_changed = true;
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;
    use crate::state::testing::Scratch;
    use crate::UnixMillis;

    fn token(parent: Option<u8>, accessor: &str, expires: Option<u64>) -> TokenRecord {
        TokenRecord {
            accessor: accessor.into(),
            policies: vec!["p".into()],
            parent: parent.map(|p| TokenHash([p; 32])),
            display_name: "t".into(),
            created_at_ms: UnixMillis(10),
            expires_at_ms: expires.map(UnixMillis),
            max_expires_at_ms: expires.map(|e| UnixMillis(e * 2)),
            ttl_ms: 100,
            renewable: true,
        }
    }

    fn create(tag: u8, parent: Option<u8>, expires: Option<u64>) -> Op {
        Op::CreateToken(CreateToken { hash: TokenHash([tag; 32]), record: token(parent, &format!("a{tag}"), expires) })
    }

    #[test]
    fn revoking_a_parent_revokes_its_descendants_and_spares_orphans() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let outcomes = s.apply_ops(vec![
            create(1, None, None),
            create(2, Some(1), Some(1000)),
            create(3, Some(2), Some(1000)),
            create(4, None, Some(1000)),
        ])?;
        assert!(outcomes.iter().all(|o| *o == Outcome::Applied), "{outcomes:?}");
        s.apply_ops(vec![Op::RevokeToken(RevokeToken { hash: TokenHash([1; 32]) })])?;
        let r = s.reader();
        for gone in [1u8, 2, 3] {
            assert!(r.token(&TokenHash([gone; 32]))?.is_none(), "token {gone} outlived the revocation");
            assert!(r.token_by_accessor(&format!("a{gone}"))?.is_none());
        }
        assert!(r.token(&TokenHash([4; 32]))?.is_some(), "an orphan is not below the revoked token");
        assert_eq!(
            r.tokens_due(UnixMillis(u64::MAX), 10)?,
            vec![TokenHash([4; 32])],
            "the expiry index holds only live tokens"
        );
        Ok(())
    }

    #[test]
    fn a_child_needs_a_live_parent_even_in_the_same_entry() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let outcomes = s.apply_ops(vec![
            create(1, None, Some(1000)),
            create(2, Some(1), Some(1000)),
            Op::RevokeToken(RevokeToken { hash: TokenHash([1; 32]) }),
            create(3, Some(1), Some(1000)),
            create(5, Some(9), Some(1000)),
        ])?;
        assert_eq!(outcomes[3], Outcome::Rejected(Rejection::TokenNotFound), "the parent was revoked just before");
        assert_eq!(outcomes[4], Outcome::Rejected(Rejection::TokenNotFound), "no such parent");
        assert!(s.reader().token(&TokenHash([2; 32]))?.is_none(), "a child made in the same entry went too");
        Ok(())
    }

    #[test]
    fn the_sweep_expires_only_what_is_due_at_its_time() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![create(1, None, Some(100)), create(2, None, Some(500))])?;
        assert_eq!(s.reader().tokens_due(UnixMillis(200), 10)?, vec![TokenHash([1; 32])]);
        // Token 1 renewed before the sweep's entry applies: the sweep leaves it.
        s.apply_ops(vec![
            Op::RenewToken(RenewToken {
                hash: TokenHash([1; 32]),
                expires_at_ms: UnixMillis(150),
                at_ms: UnixMillis(50),
            }),
            Op::ExpireTokens(ExpireTokens {
                at_ms: UnixMillis(120),
                hashes: vec![TokenHash([1; 32]), TokenHash([2; 32])],
            }),
        ])?;
        assert!(s.reader().token(&TokenHash([1; 32]))?.is_some(), "renewed past the sweep's time");
        assert!(s.reader().token(&TokenHash([2; 32]))?.is_some(), "not due");
        s.apply_ops(vec![Op::ExpireTokens(ExpireTokens { at_ms: UnixMillis(150), hashes: vec![TokenHash([1; 32])] })])?;
        assert!(s.reader().token(&TokenHash([1; 32]))?.is_none());
        Ok(())
    }

    #[test]
    fn renewal_stays_within_the_maximum_and_needs_a_live_token() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![create(1, None, Some(100))])?;
        let renew = |to, at| {
            Op::RenewToken(RenewToken {
                hash: TokenHash([1; 32]),
                expires_at_ms: UnixMillis(to),
                at_ms: UnixMillis(at),
            })
        };
        let outcomes = s.apply_ops(vec![renew(201, 50), renew(150, 120), renew(200, 50)])?;
        assert_eq!(
            outcomes,
            vec![
                Outcome::Rejected(Rejection::TokenNotRenewable),
                Outcome::Rejected(Rejection::TokenNotFound),
                Outcome::Applied
            ],
            "past the maximum; after expiry; within"
        );
        Ok(())
    }

    #[test]
    fn policies_and_roles_are_written_and_deleted() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let policy = PolicyRecord { name: "p".into(), document: "x".into(), updated_at_ms: UnixMillis(1) };
        let outcomes = s.apply_ops(vec![
            Op::PutPolicy(PutPolicy { record: policy.clone() }),
            Op::DeletePolicy(DeletePolicy { name: "q".into() }),
        ])?;
        assert_eq!(outcomes[1], Outcome::Rejected(Rejection::PolicyNotFound { name: "q".into() }));
        assert_eq!(s.reader().policy("p")?, Some(policy));
        assert_eq!(s.reader().policy_names()?, vec!["p".to_owned()]);
        s.apply_ops(vec![Op::DeletePolicy(DeletePolicy { name: "p".into() })])?;
        assert_eq!(s.reader().policy("p")?, None);
        Ok(())
    }

    #[test]
    fn a_cluster_and_its_identity_are_recorded_once_together() -> Result<(), StoreError> {
        use crate::{InitCluster, KeyringRecord, KeyringVersion};
        let s = Scratch::must_new();
        let init = |id: &str, tag: u8| {
            Op::InitClusterWithIdentity(InitClusterWithIdentity {
                cluster: InitCluster {
                    cluster: ClusterRecord {
                        cluster_id: id.into(),
                        root_kcv: "00".into(),
                        created_at_ms: UnixMillis(1),
                    },
                    keyring: KeyringRecord {
                        version: KeyringVersion(1),
                        wrapped: vec![1; 40],
                        created_at_ms: UnixMillis(1),
                    },
                },
                identity: crate::BootstrapIdentity {
                    key: IdentityKeyRecord { keyring_version: KeyringVersion(1), sealed: vec![tag; 60] },
                    root: CreateToken { hash: TokenHash([tag; 32]), record: token(None, &format!("root{tag}"), None) },
                },
            })
        };
        let outcomes = s.apply_ops(vec![init("c1", 1), init("c2", 2)])?;
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Rejected(Rejection::AlreadyInitialized)]);
        let r = s.reader();
        assert_eq!(r.cluster()?.map(|c| c.cluster_id), Some("c1".into()));
        assert_eq!(r.identity_key()?.map(|k| k.sealed), Some(vec![1; 60]), "the second wrote no key");
        assert!(r.token(&TokenHash([2; 32]))?.is_none(), "the second wrote no root token");
        assert!(r.token(&TokenHash([1; 32]))?.is_some());
        Ok(())
    }

    #[test]
    fn every_identity_change_moves_the_generation() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let before = s.reader().identity_generation();
        s.apply_ops(vec![create(1, None, None)])?;
        let after = s.reader().identity_generation();
        assert!(after > before, "a cache keyed by the generation would serve a stale token");
        Ok(())
    }
}
