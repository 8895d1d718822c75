//! `coffer.raft.v1.NodeStats`: what this node reports to the others (key usage).

use std::sync::Arc;

use coffer_proto::raft::v1::node_stats_server::NodeStats;
use coffer_proto::raft::v1::{KeyUsageRequest, KeyUsageResponse, VersionUsage};
use tonic::{Request, Response, Status};

use crate::node::Node;

/// The NodeStats service over a started node.
#[derive(Debug, Clone)]
pub struct StatsService {
    node: Arc<Node>,
}

impl StatsService {
    /// A service answering from `node`.
    pub fn new(node: Arc<Node>) -> Self {
        StatsService { node }
    }
}

#[tonic::async_trait]
impl NodeStats for StatsService {
    async fn key_usage(&self, request: Request<KeyUsageRequest>) -> Result<Response<KeyUsageResponse>, Status> {
        let name = request.into_inner().name;
        let versions = self
            .node
            .keys
            .usage(&name)
            .into_iter()
            .map(|(version, usage)| VersionUsage {
                version: version.0,
                encrypts: usage.encrypts,
                decrypts: usage.decrypts,
                last_used_ms: usage.last_used_ms,
            })
            .collect();
        Ok(Response::new(KeyUsageResponse { versions }))
    }
}
