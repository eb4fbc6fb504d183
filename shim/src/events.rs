//! Publishing task events to containerd without blocking the task service.
//!
//! Task handlers only enqueue; one forwarding thread delivers events in order,
//! retrying transient failures (containerd restarting, a dropped connection) a
//! bounded number of times so a dead containerd cannot wedge the shim.
//!
//! Events go out without protobuf reflection. containerd-shim's `RemotePublisher` names each
//! event by its message descriptor and copies it through reflection; the first event then builds
//! the descriptors of the event protos and everything they import (`descriptor.proto` with its
//! source comments among them), ~400 KiB of heap that every shim kept for the rest of its pod's
//! life (docs/benchmarks.md). Here each event type carries its protobuf name as a constant
//! ([`TypedEvent`]), and an event is encoded when it is sent, through its static type:
//! protobuf's `dyn` encoder looks the descriptor up too, for the name in a size error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::ttrpc::context;
use containerd_shim::protos::{Client, EventsClient};
use thiserror::Error;

use crate::sync::{lock, unpoison};

/// Why one publish attempt failed.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("connect to containerd at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("forward {topic}: {source}")]
    Forward {
        topic: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("encode {topic}: {source}")]
    Encode {
        topic: String,
        #[source]
        source: containerd_shim::protos::protobuf::Error,
    },
    #[error("publisher panicked")]
    Panicked,
    /// For publishers other than containerd's (test doubles, adapters).
    #[error("{0}")]
    Rejected(String),
}

/// Errors of the event queue itself.
#[derive(Debug, Error)]
pub enum EventError {
    #[error("{pending} event(s) still pending after flush timeout")]
    FlushTimeout { pending: usize },
}

/// An event type the shim publishes, with its protobuf full name: containerd's `Any.type_url`
/// for it (containerd takes the bare name, without `type.googleapis.com/`).
pub trait TypedEvent: Event + Message {
    const TYPE_URL: &'static str;
}

/// Every event of containerd's `events/task.proto` (package `containerd.events`) that we send;
/// `every_type_url_is_the_descriptors_full_name` checks the names against the descriptors.
macro_rules! task_events {
    ($($event:ident),+ $(,)?) => {
        $(impl TypedEvent for $event {
            const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($event));
        })+
    };
}

task_events!(
    TaskCreate,
    TaskStart,
    TaskDelete,
    TaskExit,
    TaskExecAdded,
    TaskExecStarted,
    TaskPaused,
    TaskResumed,
    TaskOOM,
    TaskCheckpointed,
);

/// One event, encoded when it was sent: what `Events.Forward` carries besides the namespace.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub type_url: &'static str,
    pub value: Vec<u8>,
}

impl Outgoing {
    /// Encodes `event` with its generated code; no descriptor is looked up.
    pub fn encode<E: TypedEvent>(event: &E) -> Result<Outgoing, PublishError> {
        let topic = event.topic();
        match event.write_to_bytes() {
            Ok(value) => Ok(Outgoing { topic, type_url: E::TYPE_URL, value }),
            Err(source) => Err(PublishError::Encode { topic, source }),
        }
    }
}

/// The blocking call that hands one event to containerd; the seam tests replace.
pub trait Publisher: Send + Sync {
    /// Publishes `event`; may be called again with the same event after a failure.
    fn publish(&self, namespace: &str, event: &Outgoing) -> Result<(), PublishError>;
}

/// Publishes over containerd's ttrpc `Events.Forward`, reconnecting after a failure: a failed
/// call drops the connection and the next attempt dials `address` again.
pub struct RemoteEvents {
    address: String,
    timeout: Duration,
    client: Mutex<Option<EventsClient>>,
}

impl RemoteEvents {
    /// Default per-call deadline; ttrpc's default context has none and could hang forever.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `address` (`$TTRPC_ADDRESS`, no `unix://`) now, so that a shim that cannot
    /// reach containerd fails at start; it is dialled again after a failure.
    pub fn connect(address: impl Into<String>) -> Result<RemoteEvents, PublishError> {
        let address = address.into();
        let client = dial(&address)?;
        Ok(RemoteEvents { address, timeout: Self::DEFAULT_TIMEOUT, client: Mutex::new(Some(client)) })
    }

    /// Connects on the first publish instead of now.
    pub fn lazy(address: impl Into<String>) -> RemoteEvents {
        RemoteEvents { address: address.into(), timeout: Self::DEFAULT_TIMEOUT, client: Mutex::new(None) }
    }

    /// Sets the per-call deadline.
    pub fn timeout(mut self, timeout: Duration) -> RemoteEvents {
        self.timeout = timeout;
        self
    }
}

impl Publisher for RemoteEvents {
    fn publish(&self, namespace: &str, event: &Outgoing) -> Result<(), PublishError> {
        let forward = ForwardRequest {
            envelope: Some(Envelope {
                timestamp: containerd_shim::util::timestamp().ok().into(),
                namespace: namespace.to_owned(),
                topic: event.topic.clone(),
                event: Some(Any {
                    type_url: event.type_url.to_owned(),
                    value: event.value.clone(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let mut client = lock(&self.client);
        let events = match client.take() {
            Some(events) => events,
            None => dial(&self.address)?,
        };
        let timeout_ns = i64::try_from(self.timeout.as_nanos()).unwrap_or(i64::MAX);
        events
            .forward(context::with_timeout(timeout_ns), &forward)
            .map_err(|e| PublishError::Forward { topic: event.topic.clone(), source: e.into() })?;
        // Kept only after a success: the connection may be dead (containerd restarted),
        // so a failure makes the next attempt dial again.
        *client = Some(events);
        Ok(())
    }
}

/// A ttrpc client of containerd's `Events` service at `address`.
fn dial(address: &str) -> Result<EventsClient, PublishError> {
    let connect_error = |source| PublishError::Connect { address: address.to_owned(), source };
    let fd = containerd_shim::util::connect(address).map_err(connect_error)?;
    // Client::new owns the fd from here on, and closes it on failure too.
    let client = Client::new(fd).map_err(|e| connect_error(e.into()))?;
    Ok(EventsClient::new(client))
}

/// One event as the [`RecordingPublisher`] saw it: decode `event.value` with `M::parse_from_bytes`.
#[derive(Debug, Clone)]
pub struct PublishedEvent {
    pub namespace: String,
    pub event: Outgoing,
}

#[derive(Default)]
struct RecordingState {
    events: Vec<PublishedEvent>,
    attempts: usize,
    fail_next: usize,
    delay: Duration,
}

/// Test double: records what would have been sent to containerd.
#[derive(Default)]
pub struct RecordingPublisher {
    state: Mutex<RecordingState>,
}

impl RecordingPublisher {
    pub fn new() -> RecordingPublisher {
        RecordingPublisher::default()
    }

    /// Makes the next `n` publish attempts fail.
    pub fn fail_next(&self, n: usize) {
        lock(&self.state).fail_next = n;
    }

    /// Makes every publish attempt sleep first, like a slow containerd.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// Events published successfully, in order.
    pub fn events(&self) -> Vec<PublishedEvent> {
        lock(&self.state).events.clone()
    }

    /// All publish attempts, failed ones included.
    pub fn attempts(&self) -> usize {
        lock(&self.state).attempts
    }
}

impl Publisher for RecordingPublisher {
    fn publish(&self, namespace: &str, event: &Outgoing) -> Result<(), PublishError> {
        let delay = {
            let mut state = lock(&self.state);
            state.attempts += 1;
            state.delay
        };
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        let mut state = lock(&self.state);
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(PublishError::Rejected(format!("injected failure for {}", event.topic)));
        }
        state.events.push(PublishedEvent { namespace: namespace.to_owned(), event: event.clone() });
        Ok(())
    }
}

/// How hard the forwarding thread tries before dropping an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts per event, the first included (at least 1).
    pub attempts: u32,
    /// Sleep after the first failure; doubles after each further one.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, sleeping 150+300+600+1200 ms between them: ~2.3 s per event before it is dropped.
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(150),
            max_backoff: Duration::from_millis(1200),
        }
    }
}

/// Number of events sent but not yet delivered or dropped; flush waits for zero.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    drained: Condvar,
}

impl Pending {
    fn add(&self) {
        *lock(&self.count) += 1;
    }

    fn done(&self) {
        let mut count = lock(&self.count);
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.drained.notify_all();
        }
    }
}

/// Ordered, non-blocking event delivery to containerd; clones share one queue.
#[derive(Clone)]
pub struct EventQueue {
    tx: Sender<Outgoing>,
    pending: Arc<Pending>,
}

impl EventQueue {
    /// Starts the forwarding thread with the default [`RetryPolicy`].
    pub fn start(publisher: Arc<dyn Publisher>, namespace: String) -> EventQueue {
        EventQueue::with_policy(publisher, namespace, RetryPolicy::default())
    }

    /// Starts the forwarding thread; it ends once every clone is dropped and the queue drained.
    ///
    /// Events are not worth failing the shim for: if the thread cannot be spawned,
    /// this logs an error and every `send` logs and drops its event.
    pub fn with_policy(publisher: Arc<dyn Publisher>, namespace: String, policy: RetryPolicy) -> EventQueue {
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(Pending::default());
        let thread_pending = Arc::clone(&pending);
        if let Err(e) = thread::Builder::new()
            .name("kyb-events".into())
            .spawn(move || forward(rx, publisher.as_ref(), &namespace, policy, &thread_pending))
        {
            log::error!("cannot spawn event forwarding thread, events will be dropped: {e}");
        }
        EventQueue { tx, pending }
    }

    /// Enqueues `event` for its own topic and returns at once.
    pub fn send<E: TypedEvent>(&self, event: E) {
        let event = match Outgoing::encode(&event) {
            Ok(event) => event,
            Err(e) => return log::error!("dropping event: {e}"),
        };
        self.pending.add();
        if let Err(mpsc::SendError(lost)) = self.tx.send(event) {
            log::warn!("event forwarder is gone; dropping {} event", lost.topic);
            self.pending.done();
        }
    }

    /// Waits until every event sent so far was delivered or dropped, for at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), EventError> {
        let deadline = Instant::now() + timeout;
        let mut count = lock(&self.pending.count);
        while *count > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(EventError::FlushTimeout { pending: *count });
            }
            count = unpoison(self.pending.drained.wait_timeout(count, deadline - now)).0;
        }
        Ok(())
    }
}

fn forward(rx: Receiver<Outgoing>, publisher: &dyn Publisher, namespace: &str, policy: RetryPolicy, pending: &Pending) {
    for event in rx {
        deliver(&event, publisher, namespace, policy);
        pending.done();
    }
}

fn deliver(event: &Outgoing, publisher: &dyn Publisher, namespace: &str, policy: RetryPolicy) {
    let attempts = policy.attempts.max(1);
    let mut backoff = policy.initial_backoff;
    for attempt in 1..=attempts {
        // A panicking publisher must not kill the thread and silently stop all later events.
        let result = catch_unwind(AssertUnwindSafe(|| publisher.publish(namespace, event)))
            .unwrap_or(Err(PublishError::Panicked));
        match result {
            Ok(()) => return,
            Err(e) if attempt < attempts => {
                log::debug!("publish {} (attempt {attempt}/{attempts}) failed: {e}; retrying", event.topic);
                thread::sleep(backoff);
                backoff = (backoff * 2).min(policy.max_backoff);
            }
            Err(e) => {
                log::warn!("dropping {} event after {attempts} attempts: {e}", event.topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::{Message, MessageFull};
    use containerd_shim::protos::topics;

    fn fast_policy() -> RetryPolicy {
        RetryPolicy { attempts: 5, initial_backoff: Duration::from_millis(5), max_backoff: Duration::from_millis(20) }
    }

    fn start(publisher: &Arc<RecordingPublisher>) -> EventQueue {
        let publisher: Arc<dyn Publisher> = publisher.clone();
        EventQueue::with_policy(publisher, "k8s.io".into(), fast_policy())
    }

    fn start_event(pid: u32) -> TaskStart {
        TaskStart { container_id: "c1".into(), pid, ..Default::default() }
    }

    fn pids(events: &[PublishedEvent]) -> Vec<u32> {
        events.iter().map(|e| TaskStart::parse_from_bytes(&e.event.value).unwrap().pid).collect()
    }

    #[test]
    fn every_type_url_is_the_descriptors_full_name() {
        fn check<E: TypedEvent + MessageFull>() {
            assert_eq!(E::TYPE_URL, E::descriptor().full_name());
        }
        check::<TaskCreate>();
        check::<TaskStart>();
        check::<TaskDelete>();
        check::<TaskExit>();
        check::<TaskExecAdded>();
        check::<TaskExecStarted>();
        check::<TaskPaused>();
        check::<TaskResumed>();
        check::<TaskOOM>();
        check::<TaskCheckpointed>();
    }

    #[test]
    fn delivers_in_order_with_topic_and_namespace() {
        let publisher = Arc::new(RecordingPublisher::new());
        let queue = start(&publisher);
        for pid in 1..=50 {
            queue.send(start_event(pid));
        }
        queue.send(TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 50,
            exit_status: 137,
            ..Default::default()
        });
        queue.flush(Duration::from_secs(10)).unwrap();

        let events = publisher.events();
        assert_eq!(pids(&events[..50]), (1..=50).collect::<Vec<_>>());
        assert!(events[..50]
            .iter()
            .all(|e| e.event.topic == topics::TASK_START_EVENT_TOPIC && e.namespace == "k8s.io"));
        let exit = &events[50].event;
        assert_eq!(exit.topic, topics::TASK_EXIT_EVENT_TOPIC);
        assert_eq!(exit.type_url, "containerd.events.TaskExit");
        assert_eq!(TaskExit::parse_from_bytes(&exit.value).unwrap().exit_status, 137);
    }

    /// Blocks inside `publish` until the test releases it, like a hung containerd.
    struct GatedPublisher {
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
        inner: RecordingPublisher,
    }

    impl Publisher for GatedPublisher {
        fn publish(&self, namespace: &str, event: &Outgoing) -> Result<(), PublishError> {
            let _ = lock(&self.entered).send(());
            let _ = lock(&self.release).recv();
            self.inner.publish(namespace, event)
        }
    }

    #[test]
    fn send_does_not_wait_for_a_slow_publisher() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let publisher = Arc::new(GatedPublisher {
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
            inner: RecordingPublisher::new(),
        });
        let queue = EventQueue::with_policy(publisher.clone(), "default".into(), fast_policy());
        queue.send(start_event(0));
        entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();

        // The publisher is stuck on event 0; these must all return anyway.
        for pid in 1..=100 {
            queue.send(start_event(pid));
        }
        assert!(publisher.inner.events().is_empty());

        for _ in 0..=100 {
            release_tx.send(()).unwrap();
        }
        queue.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(pids(&publisher.inner.events()), (0..=100).collect::<Vec<_>>());
    }

    #[test]
    fn slow_publisher_keeps_order() {
        let publisher = Arc::new(RecordingPublisher::new());
        publisher.set_delay(Duration::from_millis(20));
        let queue = start(&publisher);
        for pid in 0..10 {
            queue.send(start_event(pid));
        }
        queue.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(pids(&publisher.events()), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn transient_failures_are_retried_and_delivered_once() {
        let publisher = Arc::new(RecordingPublisher::new());
        publisher.fail_next(3);
        let queue = start(&publisher);
        queue.send(TaskOOM { container_id: "c1".into(), ..Default::default() });
        queue.send(start_event(7));
        queue.flush(Duration::from_secs(10)).unwrap();

        let events = publisher.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.topic, topics::TASK_OOM_EVENT_TOPIC);
        assert_eq!(events[1].event.topic, topics::TASK_START_EVENT_TOPIC);
        assert_eq!(publisher.attempts(), 5);
    }

    #[test]
    fn permanent_failure_drops_the_event_and_the_queue_keeps_working() {
        let publisher = Arc::new(RecordingPublisher::new());
        publisher.fail_next(5);
        let queue = start(&publisher);
        queue.send(start_event(1));
        queue.send(start_event(2));
        queue.flush(Duration::from_secs(10)).unwrap();

        assert_eq!(pids(&publisher.events()), vec![2]);
        assert_eq!(publisher.attempts(), 6);
    }

    struct PanickingPublisher;

    impl Publisher for PanickingPublisher {
        fn publish(&self, _: &str, _: &Outgoing) -> Result<(), PublishError> {
            panic!("boom");
        }
    }

    #[test]
    fn a_panicking_publisher_does_not_stop_the_queue() {
        let queue = EventQueue::with_policy(Arc::new(PanickingPublisher), "default".into(), fast_policy());
        queue.send(start_event(1));
        queue.send(start_event(2));
        queue.flush(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn flush_waits_for_delivery_and_times_out_when_stuck() {
        let publisher = Arc::new(RecordingPublisher::new());
        publisher.set_delay(Duration::from_millis(200));
        let queue = start(&publisher);
        queue.send(start_event(1));
        queue.send(start_event(2));
        let err = queue.flush(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, EventError::FlushTimeout { pending } if pending >= 1), "{err}");

        queue.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(pids(&publisher.events()), vec![1, 2]);
        // Nothing pending: returns at once.
        queue.flush(Duration::ZERO).unwrap();
    }

    /// A stand-in for containerd's ttrpc Events service.
    #[derive(Default)]
    struct FakeContainerd {
        received: Mutex<Vec<(String, String, String)>>,
    }

    impl containerd_shim::protos::shim_sync::Events for FakeContainerd {
        fn forward(
            &self,
            _ctx: &containerd_shim::protos::ttrpc::TtrpcContext,
            req: containerd_shim::protos::shim::events::ForwardRequest,
        ) -> containerd_shim::protos::ttrpc::Result<containerd_shim::protos::types::empty::Empty> {
            let envelope = req.envelope;
            let type_url = envelope.event.type_url.clone();
            lock(&self.received).push((envelope.topic.clone(), envelope.namespace.clone(), type_url));
            Ok(Default::default())
        }
    }

    fn serve(socket: &std::path::Path, fake: &Arc<FakeContainerd>) -> containerd_shim::protos::ttrpc::Server {
        let _ = std::fs::remove_file(socket);
        let service: Arc<dyn containerd_shim::protos::shim_sync::Events + Send + Sync> = fake.clone();
        let mut server = containerd_shim::protos::ttrpc::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(containerd_shim::protos::shim_sync::create_events(service));
        server.start().unwrap();
        server
    }

    #[test]
    fn remote_events_reconnects_after_containerd_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let fake = Arc::new(FakeContainerd::default());
        let server = serve(&socket, &fake);
        let remote = RemoteEvents::connect(socket.to_string_lossy()).unwrap().timeout(Duration::from_secs(2));
        remote.publish("k8s.io", &Outgoing::encode(&start_event(1)).unwrap()).unwrap();
        server.shutdown();

        let err = remote.publish("k8s.io", &Outgoing::encode(&start_event(2)).unwrap()).unwrap_err();
        assert!(matches!(err, PublishError::Forward { .. } | PublishError::Connect { .. }), "{err}");

        let server = serve(&socket, &fake);
        remote.publish("k8s.io", &Outgoing::encode(&TaskOOM::default()).unwrap()).unwrap();
        server.shutdown();

        let received = lock(&fake.received).clone();
        assert_eq!(
            received,
            vec![
                ("/tasks/start".to_owned(), "k8s.io".to_owned(), "containerd.events.TaskStart".to_owned()),
                ("/tasks/oom".to_owned(), "k8s.io".to_owned(), "containerd.events.TaskOOM".to_owned()),
            ]
        );
    }

    #[test]
    fn queue_delivers_once_containerd_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let fake = Arc::new(FakeContainerd::default());
        let remote = Arc::new(RemoteEvents::lazy(socket.to_string_lossy()).timeout(Duration::from_secs(2)));
        let policy = RetryPolicy {
            attempts: 20,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        };
        let queue = EventQueue::with_policy(remote, "default".into(), policy);
        queue.send(start_event(1));
        thread::sleep(Duration::from_millis(100));
        let server = serve(&socket, &fake);
        queue.send(TaskOOM::default());
        queue.flush(Duration::from_secs(10)).unwrap();
        server.shutdown();

        let topics_seen: Vec<String> = lock(&fake.received).iter().map(|(t, _, _)| t.clone()).collect();
        assert_eq!(topics_seen, vec!["/tasks/start", "/tasks/oom"]);
    }

    #[test]
    fn clones_share_one_ordered_queue() {
        let publisher = Arc::new(RecordingPublisher::new());
        let queue = start(&publisher);
        let clone = queue.clone();
        let sender = thread::spawn(move || {
            for pid in 0..20 {
                clone.send(start_event(pid));
            }
        });
        sender.join().unwrap();
        queue.send(start_event(20));
        queue.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(pids(&publisher.events()), (0..=20).collect::<Vec<_>>());
    }

    #[test]
    fn remote_events_reports_connect_failures() {
        let remote = RemoteEvents::lazy("/nonexistent/containerd.sock.ttrpc").timeout(Duration::from_millis(100));
        let err = remote.publish("default", &Outgoing::encode(&start_event(1)).unwrap());
        assert!(matches!(err, Err(PublishError::Connect { .. })), "{err:?}");
        let err = RemoteEvents::connect("/nonexistent/containerd.sock.ttrpc").err();
        assert!(matches!(err, Some(PublishError::Connect { .. })), "{err:?}");
    }
}
