//! Version, health, and keeld's supervision record.

use std::sync::Arc;

use keel_actors::supervision::SupervisionStats;
use keel_protocol::api::version::{health_check_response::ServingStatus, *};
use keel_protocol::api::version_ttrpc;
use keel_protocol::types::timestamp;
use protobuf::well_known_types::empty::Empty;
use ttrpc::asynchronous::TtrpcContext;

use super::{guarded, Rpc};
use crate::server::Auth;

#[derive(Debug)]
pub struct VersionService {
    pub auth: Arc<Auth>,
    /// Every supervisor's record.
    pub stats: SupervisionStats,
}

#[async_trait::async_trait]
impl version_ttrpc::Version for VersionService {
    async fn version(&self, ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VersionResponse> {
        guarded("Version.Version", async move {
            self.auth.request(ctx, "Version.Version").rpc()?;
            Ok(VersionResponse {
                version: crate::VERSION.to_string(),
                revision: crate::REVISION.to_string(),
                ..Default::default()
            })
        })
        .await
    }
}

#[async_trait::async_trait]
impl version_ttrpc::Health for VersionService {
    async fn check(
        &self,
        ctx: &TtrpcContext,
        _: HealthCheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        guarded("Health.Check", async move {
            self.auth.request(ctx, "Health.Check").rpc()?;
            Ok(HealthCheckResponse {
                status: ServingStatus::SERVING.into(),
                message: "serving".into(),
                ..Default::default()
            })
        })
        .await
    }

    async fn supervision(
        &self,
        ctx: &TtrpcContext,
        _: Empty,
    ) -> ttrpc::Result<SupervisionResponse> {
        guarded("Health.Supervision", async move {
            self.auth.request(ctx, "Health.Supervision").rpc()?;
            let supervisors = self
                .stats
                .snapshot()
                .into_iter()
                .map(|(name, s)| Supervisor {
                    name,
                    strategy: s.strategy.to_string(),
                    max_restarts: s.intensity.max,
                    within_secs: s.intensity.within.as_secs(),
                    restarts: s.restarts,
                    escalations: s.escalations,
                    last_cause: s.last_cause,
                    last_failure: s.last_failure.map(timestamp).into(),
                    ..Default::default()
                })
                .collect();
            Ok(SupervisionResponse {
                supervisors,
                ..Default::default()
            })
        })
        .await
    }
}
