//! `lockstep.coordinator.v1.Admin` over the functions of [`super`]. Every error maps through
//! the coordinator's one mapping (`transport::status_of`). Authentication, when it lands, must
//! require the admin role on this whole service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

use crate::core::UserId;
use crate::service::{ServiceError, TransactionCoordinator};
use crate::transport::status_of;

#[derive(Debug, Clone)]
pub struct AdminService {
    coordinator: Arc<TransactionCoordinator>,
}

impl AdminService {
    pub fn server(coordinator: Arc<TransactionCoordinator>) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { coordinator })
    }
}

fn user(raw: &str) -> Result<UserId, Status> {
    UserId::parse("user_id", raw).map_err(|error| status_of(ServiceError::InvalidArgument(error)))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn inspect(&self, request: Request<pb::InspectRequest>) -> Result<Response<pb::InspectReply>, Status> {
        let request = request.into_inner();
        let user = user(&request.user_id)?;
        super::inspect(&self.coordinator, &user, request.ledger_entries)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseReply>, Status> {
        let request = request.into_inner();
        let user = user(&request.user_id)?;
        let expected = (!request.lock_id.is_empty()).then_some(request.lock_id.as_str());
        super::release_lease(&self.coordinator, &user, expected, request.confirm)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn audit(&self, request: Request<pb::AuditRequest>) -> Result<Response<pb::AuditReply>, Status> {
        let margin = match request.into_inner().lease_margin_secs {
            0 => crate::audit::LEASE_MARGIN_DEFAULT,
            seconds => Duration::from_secs(seconds),
        };
        super::audit(&self.coordinator, margin)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<pb::BackupReply>, Status> {
        let path = PathBuf::from(request.into_inner().path);
        if path.as_os_str().is_empty() {
            return Err(Status::invalid_argument("path: required"));
        }
        super::backup(&self.coordinator, &path)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn contended_users(
        &self,
        request: Request<pb::ContendedUsersRequest>,
    ) -> Result<Response<pb::ContendedUsersReply>, Status> {
        Ok(Response::new(super::contended_users(request.into_inner().limit)))
    }
}
