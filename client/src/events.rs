//! Event subscriptions that resume by themselves.
//!
//! A [`Subscription`] is a `Stream` of [`Envelope`]s in sequence order. It
//! remembers the sequence number of the last event it yielded; when its stream
//! ends for any reason but a bad request (keeld restarted, the connection
//! dropped, keeld cut the subscriber off for falling behind) it subscribes again
//! from that number, so each event is yielded once and none is skipped. What
//! keel itself cannot give back is never hidden: a replay that begins before the
//! oldest retained event, and events keeld lost in a crash before writing them
//! out, come as an [`Event::Gap`] item with the range.
//!
//! Resubscribing goes on however long keeld is away; each attempt that fails
//! for longer than the client's reconnect timeout is told as an `Unavailable`
//! item, and the stream goes on. A request keeld refuses (a bad filter) is the
//! stream's one and last item.
//!
//! ```no_run
//! use futures::StreamExt;
//!
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! let mut events = client.subscribe(&["topic~=\"/tasks/\""], None).await?;
//! while let Some(item) = events.next().await {
//!     let env = item?;
//!     if let keel_client::Event::TaskExit(exit) = &env.event {
//!         println!("{} exited with {}", exit.container_id, exit.exit_status);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::Stream;
use keel_protocol::api::events::{Gap, SubscribeRequest};
use keel_protocol::containerd::events::{container as c, task as t};
use keel_protocol::types::{system_time, unpack};
use keel_protocol::{Error, Result};
use protobuf::well_known_types::any::Any;
use protobuf::MessageFull;

use crate::client::{classify, Backoff, Client};

/// The topic of keel's gap notices.
pub const GAP_TOPIC: &str = "/keel/events/gap";

/// One event, with where it stands in keeld's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// keeld's sequence number: strictly increasing, across restarts too.
    pub sequence: u64,
    /// When it was published.
    pub timestamp: SystemTime,
    /// The namespace it belongs to.
    pub namespace: String,
    /// Its topic, e.g. `/tasks/exit`.
    pub topic: String,
    /// Its payload, decoded.
    pub event: Event,
}

/// An event's payload: containerd's task and container events decoded, keel's
/// gap notices, and anything else as it came.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Event {
    TaskCreate(t::TaskCreate),
    TaskStart(t::TaskStart),
    TaskExit(t::TaskExit),
    TaskDelete(t::TaskDelete),
    TaskOom(t::TaskOOM),
    TaskExecAdded(t::TaskExecAdded),
    TaskExecStarted(t::TaskExecStarted),
    TaskPaused(t::TaskPaused),
    TaskResumed(t::TaskResumed),
    TaskCheckpointed(t::TaskCheckpointed),
    ContainerCreate(c::ContainerCreate),
    ContainerUpdate(c::ContainerUpdate),
    ContainerDelete(c::ContainerDelete),
    /// Events that cannot be delivered: see [`Gap`]'s fields.
    Gap(Gap),
    /// Any other type (published by clients), undecoded.
    Other(Any),
}

impl Event {
    /// Decodes a payload by its type.
    pub fn decode(topic: &str, any: Any) -> Self {
        fn is<M: MessageFull>(any: &Any) -> bool {
            any.type_url.rsplit('/').next() == Some(M::descriptor().full_name())
        }
        macro_rules! decode {
            ($($ty:ty => $variant:ident),* $(,)?) => {
                $(if is::<$ty>(&any) {
                    if let Ok(m) = unpack::<$ty>(&any) {
                        return Event::$variant(m);
                    }
                })*
            };
        }
        decode!(
            t::TaskCreate => TaskCreate,
            t::TaskStart => TaskStart,
            t::TaskExit => TaskExit,
            t::TaskDelete => TaskDelete,
            t::TaskOOM => TaskOom,
            t::TaskExecAdded => TaskExecAdded,
            t::TaskExecStarted => TaskExecStarted,
            t::TaskPaused => TaskPaused,
            t::TaskResumed => TaskResumed,
            t::TaskCheckpointed => TaskCheckpointed,
            c::ContainerCreate => ContainerCreate,
            c::ContainerUpdate => ContainerUpdate,
            c::ContainerDelete => ContainerDelete,
        );
        if topic == GAP_TOPIC && is::<Gap>(&any) {
            if let Ok(g) = unpack::<Gap>(&any) {
                return Event::Gap(g);
            }
        }
        Event::Other(any)
    }
}

impl Envelope {
    fn from_proto(e: keel_protocol::api::events::Envelope) -> Self {
        Self {
            sequence: e.sequence,
            timestamp: e
                .timestamp
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, system_time),
            event: Event::decode(&e.topic, e.event.unwrap_or_default()),
            namespace: e.namespace,
            topic: e.topic,
        }
    }
}

/// What a subscription needs to go on, owned by whichever `next` runs.
struct Cursor {
    client: Client,
    filters: Vec<String>,
    /// The last sequence number yielded (or the starting point).
    last: u64,
    stream: Option<(
        u64,
        keel_protocol::ttrpc::asynchronous::ClientStreamReceiver<
            keel_protocol::api::events::Envelope,
        >,
    )>,
    /// A bad request ended it: nothing more comes.
    done: bool,
    /// Subscriptions in a row that ended without an event.
    failures: u32,
    pause: Backoff,
}

/// A `Stream` of events that resumes across keeld restarts: see the module
/// documentation.
pub struct Subscription {
    cursor: Option<Cursor>,
    pending: Option<BoxFuture<'static, (Cursor, Option<Result<Envelope>>)>>,
    last: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("last_sequence", &self.last)
            .finish()
    }
}

impl Subscription {
    /// The sequence number of the last event yielded (or the one it started
    /// after): persist it, and pass it as `since` to resume from there later.
    pub fn last_sequence(&self) -> u64 {
        self.last
    }
}

impl Client {
    /// Subscribes to the events matching any of `filters` (containerd's filter
    /// language over `topic`, `namespace` and `event.<field>`; all events when
    /// there are none), from after sequence number `since`, or from now. A filter
    /// keeld cannot parse comes back as the stream's first and last item
    /// (InvalidArgument).
    pub async fn subscribe(&self, filters: &[&str], since: Option<u64>) -> Result<Subscription> {
        let since = match since {
            Some(s) => s,
            None => self.events_head().await?,
        };
        let mut cursor = Cursor {
            client: self.clone(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            last: since,
            stream: None,
            done: false,
            failures: 0,
            pause: Backoff::new(),
        };
        // Sent now; keeld's refusal of a bad filter is the stream's first item,
        // and ends it.
        cursor.open().await?;
        Ok(Subscription {
            cursor: Some(cursor),
            pending: None,
            last: since,
        })
    }
}

impl Cursor {
    /// Subscribes from `last`, waiting for keeld while it is down (up to the
    /// client's reconnect timeout, then Unavailable). keeld's answer to the
    /// request itself (a bad filter) comes with the first `recv`.
    async fn open(&mut self) -> Result<()> {
        let req = SubscribeRequest {
            filters: self.filters.clone(),
            since: Some(self.last),
            ..Default::default()
        };
        let mut outage = None;
        let mut pause = Backoff::new();
        loop {
            let lease = self.client.connection(&mut outage).await?;
            match lease
                .raw
                .events
                .subscribe(self.client.context_with(None), &req)
                .await
                .map_err(classify)
            {
                Ok(rx) => {
                    self.stream = Some((lease.generation(), rx));
                    return Ok(());
                }
                Err(Error::Transport(e)) => {
                    self.client.broken(lease.generation()).await;
                    let since = *outage.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= self.client.reconnect_timeout() {
                        return Err(Error::Unavailable(format!("subscribing: {e}")));
                    }
                    pause.sleep().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next event, subscribing again as often as it takes.
    async fn next(mut self) -> (Self, Option<Result<Envelope>>) {
        loop {
            if self.done {
                return (self, None);
            }
            if self.stream.is_none() {
                // Not at once after a failure: a keeld that accepts and drops
                // connections (at its connection limit) is not hammered.
                if self.failures > 0 {
                    self.pause.sleep().await;
                }
                if let Err(e) = self.open().await {
                    self.failures += 1;
                    self.done = is_final(&e);
                    return (self, Some(Err(e)));
                }
            }
            let Some((generation, rx)) = self.stream.as_mut() else {
                continue;
            };
            let generation = *generation;
            match rx.recv().await.map_err(classify) {
                Ok(Some(env)) => {
                    self.failures = 0;
                    self.pause.reset();
                    // A replay never goes back; skip anything at or before what
                    // was yielded, whatever happens.
                    if env.sequence <= self.last {
                        continue;
                    }
                    self.last = env.sequence;
                    return (self, Some(Ok(Envelope::from_proto(env))));
                }
                // keeld ended the stream (it is stopping), or cut this
                // subscriber off (Unavailable): subscribe again from `last`.
                Ok(None) | Err(Error::Unavailable(_)) => {
                    self.failures += 1;
                    self.stream = None;
                }
                Err(Error::Transport(_)) => {
                    self.failures += 1;
                    self.stream = None;
                    self.client.broken(generation).await;
                }
                // The request itself is refused: nothing more will come.
                Err(e) if is_final(&e) => {
                    self.done = true;
                    return (self, Some(Err(e)));
                }
                // Anything else (a limit reached, a failure inside keeld) is
                // told, and the next poll subscribes again.
                Err(e) => {
                    self.failures += 1;
                    self.stream = None;
                    return (self, Some(Err(e)));
                }
            }
        }
    }
}

/// Errors after which subscribing again cannot help: the request is wrong.
fn is_final(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument(_) | Error::PermissionDenied(_) | Error::Unimplemented(_)
    )
}

impl Stream for Subscription {
    type Item = Result<Envelope>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.pending.is_none() {
            let Some(cursor) = self.cursor.take() else {
                return Poll::Ready(None);
            };
            self.pending = Some(Box::pin(cursor.next()));
        }
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Ready(None);
        };
        match pending.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((cursor, item)) => {
                self.pending = None;
                self.last = cursor.last;
                self.cursor = Some(cursor);
                Poll::Ready(item)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::types::pack;

    #[test]
    fn containerd_events_decode_to_their_variant() {
        let mut exit = t::TaskExit::new();
        exit.container_id = "web".into();
        exit.exit_status = 3;
        match Event::decode("/tasks/exit", pack(&exit).unwrap()) {
            Event::TaskExit(e) => assert_eq!((e.container_id.as_str(), e.exit_status), ("web", 3)),
            other => panic!("{other:?}"),
        }
        let gap = Gap {
            lost_after: 4,
            lost_before: 9,
            ..Default::default()
        };
        assert!(
            matches!(Event::decode(GAP_TOPIC, pack(&gap).unwrap()), Event::Gap(g) if g.lost_before == 9)
        );
        // A gap published under another topic is not keel's notice.
        assert!(matches!(
            Event::decode("/app/x", pack(&gap).unwrap()),
            Event::Other(_)
        ));
        let other = Any {
            type_url: "example.com/Thing".into(),
            value: vec![1],
            ..Default::default()
        };
        assert!(matches!(Event::decode("/app/x", other), Event::Other(_)));
    }
}
