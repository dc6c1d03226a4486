//! Round trips over a real ttrpc unix socket: keel's own services, and the shim client
//! speaking `containerd.task.v2.Task` (or `v3`) to a server that only knows that name.

use std::sync::Arc;

use keel_protocol::api::{version, version_ttrpc};
use keel_protocol::containerd::{api, shim_async};
use keel_protocol::shim::{ShimClient, TASK_SERVICE_V2, TASK_SERVICE_V3};
use keel_protocol::{Client, Error, NAMESPACE_KEY};
use ttrpc::asynchronous::{Server, TtrpcContext};

struct FakeVersion;

#[async_trait::async_trait]
impl version_ttrpc::Version for FakeVersion {
    async fn version(
        &self,
        ctx: &TtrpcContext,
        _: protobuf::well_known_types::empty::Empty,
    ) -> ttrpc::Result<version::VersionResponse> {
        let ns = ctx
            .metadata
            .get(NAMESPACE_KEY)
            .and_then(|v| v.first())
            .cloned();
        if ns.as_deref() != Some("ns1") {
            return Err(Error::InvalidArgument(format!("namespace was {ns:?}")).into());
        }
        Ok(version::VersionResponse {
            version: "1.2.3".into(),
            revision: "abc".into(),
            ..Default::default()
        })
    }
}

struct FakeShim;

#[async_trait::async_trait]
impl shim_async::Task for FakeShim {
    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: 7,
            task_pid: 8,
            version: req.id,
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        if req.id == "missing" {
            return Err(Error::NotFound(format!("task {}", req.id)).into());
        }
        Ok(api::WaitResponse {
            exit_status: 137,
            ..Default::default()
        })
    }
}

async fn serve(dir: &tempfile::TempDir) -> (Server, String) {
    serve_task_as(dir, TASK_SERVICE_V2).await
}

/// A server with keel's version service and the fake shim under `task_service` only.
async fn serve_task_as(dir: &tempfile::TempDir, task_service: &str) -> (Server, String) {
    let path = dir.path().join("s.sock");
    let addr = format!("unix://{}", path.display());
    // Register the crate's generated task service under the v2 name a 1.6 shim uses,
    // so a client that still said v3 would get UNIMPLEMENTED here too.
    let mut shim = shim_async::create_task(Arc::new(FakeShim));
    let svc = shim.drain().map(|(_, v)| v).next().expect("one service");
    let mut services = std::collections::HashMap::new();
    services.insert(task_service.to_string(), svc);
    let mut server = Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(version_ttrpc::create_version(Arc::new(FakeVersion)))
        .register_service(services);
    server.start().await.unwrap();
    (server, addr)
}

#[tokio::test]
async fn keel_client_round_trip_carries_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&dir).await;

    let c = Client::connect(&addr, Some("ns1")).await.unwrap();
    assert_eq!(
        c.daemon_version().await.unwrap(),
        ("1.2.3".into(), "abc".into())
    );

    let other = Client::connect(&addr, Some("ns2")).await.unwrap();
    let err = other.daemon_version().await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("ns2")),
        "{err:?}"
    );

    // A service the server does not have is a clear error, not a hang.
    let err = c
        .content
        .info(c.ctx(), &Default::default())
        .await
        .map_err(Error::from)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_) | Error::Unimplemented(_)),
        "{err:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shim_client_speaks_task_v2() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&dir).await;

    let shim = ShimClient::connect(&addr, "default").await.unwrap();
    let req = api::ConnectRequest {
        id: "t1".into(),
        ..Default::default()
    };
    let resp = shim.connect_shim(&req, None).await.unwrap();
    assert_eq!(
        (resp.shim_pid, resp.task_pid, resp.version.as_str()),
        (7, 8, "t1")
    );

    let wait = shim
        .wait(
            &api::WaitRequest {
                id: "t1".into(),
                ..Default::default()
            },
            None,
        )
        .await;
    assert_eq!(wait.unwrap().exit_status, 137);

    let err = shim
        .wait(
            &api::WaitRequest {
                id: "missing".into(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");

    // Methods the fake leaves at the generated default answer with an error naming them.
    let err = shim.pids(&Default::default(), None).await.unwrap_err();
    assert!(err.message().contains("Pids"), "{err:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shim_client_speaks_the_task_api_the_shim_announced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve_task_as(&dir, TASK_SERVICE_V3).await;
    let req = api::ConnectRequest {
        id: "t3".into(),
        ..Default::default()
    };
    // Spoken to as a 1.6 shim, a v3-only shim does not know the service.
    let v2 = ShimClient::connect(&addr, "default").await.unwrap();
    let err = v2.connect_shim(&req, None).await.unwrap_err();
    assert!(
        err.message().contains(TASK_SERVICE_V2) && err.message().contains("does not exist"),
        "{err:?}"
    );
    let v3 = v2.task_api(3).unwrap();
    let resp = v3.connect_shim(&req, None).await.unwrap();
    assert_eq!((resp.shim_pid, resp.version.as_str()), (7, "t3"));
    // Only the versions keel speaks.
    for v in [0, 1, 4] {
        let err = ShimClient::connect(&addr, "default")
            .await
            .unwrap()
            .task_api(v)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{v}: {err:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_to_missing_socket_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("none.sock").display());
    let err = Client::connect(&addr, None).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}
