//! Version and health.

use std::sync::Arc;

use keel_protocol::api::version::{health_check_response::ServingStatus, *};
use keel_protocol::api::version_ttrpc;
use protobuf::well_known_types::empty::Empty;
use ttrpc::asynchronous::TtrpcContext;

use super::Rpc;
use crate::server::Auth;

#[derive(Debug)]
pub struct VersionService {
    pub auth: Arc<Auth>,
}

#[async_trait::async_trait]
impl version_ttrpc::Version for VersionService {
    async fn version(&self, ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VersionResponse> {
        self.auth.request(ctx, "Version.Version").rpc()?;
        Ok(VersionResponse {
            version: crate::VERSION.to_string(),
            revision: crate::REVISION.to_string(),
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl version_ttrpc::Health for VersionService {
    async fn check(
        &self,
        ctx: &TtrpcContext,
        _: HealthCheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        self.auth.request(ctx, "Health.Check").rpc()?;
        Ok(HealthCheckResponse {
            status: ServingStatus::SERVING.into(),
            message: "serving".into(),
            ..Default::default()
        })
    }
}
