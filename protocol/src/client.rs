//! Typed async client of keeld, used by keelctl and the tests.
//!
//! Every call carries the client's namespace in the `containerd-namespace-ttrpc`
//! metadata key, as containerd's clients do. Errors come back as [`Error`], rebuilt
//! from the ttrpc status, so callers branch on the code, never on message text.

use std::collections::HashMap;

use ttrpc::asynchronous::Client as TtrpcClient;
use ttrpc::context::Context;

use crate::api::{containers_ttrpc, content_ttrpc, events_ttrpc, tasks_ttrpc, version_ttrpc};
use crate::{Error, Result, DEFAULT_NAMESPACE, NAMESPACE_KEY};

/// A connection to keeld. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    namespace: String,
    pub version: version_ttrpc::VersionClient,
    pub health: version_ttrpc::HealthClient,
    pub containers: containers_ttrpc::ContainersClient,
    pub tasks: tasks_ttrpc::TasksClient,
    pub events: events_ttrpc::EventsClient,
    pub content: content_ttrpc::ContentClient,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// Turns a plain socket path into the `unix://` address ttrpc expects.
pub fn socket_address(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    }
}

impl Client {
    /// Connects to keeld at `address` (a socket path or `unix://` address).
    pub async fn connect(address: &str, namespace: Option<&str>) -> Result<Self> {
        let addr = socket_address(address);
        let inner = TtrpcClient::connect(&addr).await.map_err(|e| {
            Error::Unavailable(format!("cannot connect to keeld at {address}: {e}"))
        })?;
        Ok(Self::from_ttrpc(
            inner,
            namespace.unwrap_or(DEFAULT_NAMESPACE),
        ))
    }

    /// Wraps an existing ttrpc connection.
    pub fn from_ttrpc(inner: TtrpcClient, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            version: version_ttrpc::VersionClient::new(inner.clone()),
            health: version_ttrpc::HealthClient::new(inner.clone()),
            containers: containers_ttrpc::ContainersClient::new(inner.clone()),
            tasks: tasks_ttrpc::TasksClient::new(inner.clone()),
            events: events_ttrpc::EventsClient::new(inner.clone()),
            content: content_ttrpc::ContentClient::new(inner),
        }
    }

    /// The same connection, sending `namespace`.
    pub fn with_namespace(&self, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// The namespace this client sends.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A call context carrying the namespace and no timeout.
    pub fn ctx(&self) -> Context {
        let mut metadata = HashMap::new();
        metadata.insert(NAMESPACE_KEY.to_string(), vec![self.namespace.clone()]);
        Context {
            metadata,
            timeout_nano: 0,
        }
    }

    /// The daemon's version and git revision.
    pub async fn daemon_version(&self) -> Result<(String, String)> {
        let resp = self
            .version
            .version(self.ctx(), &Default::default())
            .await?;
        Ok((resp.version, resp.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_become_unix_addresses() {
        assert_eq!(
            socket_address("/run/keel/keel.sock"),
            "unix:///run/keel/keel.sock"
        );
        assert_eq!(socket_address("unix:///x.sock"), "unix:///x.sock");
    }

    #[test]
    fn context_carries_the_namespace() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            a.set_nonblocking(true).unwrap();
            let sock = ttrpc::asynchronous::transport::Socket::from(
                tokio::net::UnixStream::from_std(a).unwrap(),
            );
            let c = Client::from_ttrpc(TtrpcClient::new(sock), "prod");
            assert_eq!(
                c.ctx().metadata.get(NAMESPACE_KEY),
                Some(&vec!["prod".to_string()])
            );
        });
    }
}
