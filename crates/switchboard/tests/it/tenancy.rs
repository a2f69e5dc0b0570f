//! Tenancy, randomized: random populations of sockets (users × namespaces) and random
//! sequences of send / broadcast / disconnect, on each transport. Every delivery must reach
//! exactly the sockets docs/CONFIG.md says, and no other.
//!
//! Each delivery carries a unique id. After each operation a marker is broadcast, and every
//! live socket is read up to that marker: what it got before the marker must be exactly the
//! ids the model says (frames of one socket arrive in the order they were queued, and the
//! built-in subscribers queue synchronously inside `producer.send`). The gateway's registry
//! counts are compared with the model after every step too.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use switchboard::Running;
use switchboard_test_support::{
    container, each_transport, spec_config, start, Client, Event, Kind,
};

const USERS: &[&str] = &["alex", "sam", "kim"];
const SEND: &str = "socket:send";
const BROADCAST: &str = "socket:broadcast";
/// How long a socket may take to show a frame the model says is coming.
const FRAME_WAIT: Duration = Duration::from_secs(3);

/// The namespace a socket connects with.
#[derive(Debug, Clone, Copy)]
enum Joined {
    In(&'static str),
    /// No `namespace` query parameter.
    Absent,
    /// `?namespace=` (empty): the same as absent, per docs/CONFIG.md.
    Empty,
}

impl Joined {
    fn namespace(self) -> Option<&'static str> {
        match self {
            Joined::In(ns) => Some(ns),
            Joined::Absent | Joined::Empty => None,
        }
    }
}

/// The `namespace` field of a send or broadcast.
#[derive(Debug, Clone, Copy)]
enum NsField {
    Is(&'static str),
    /// The key is left out.
    Absent,
    /// `"namespace": null`: the same as absent.
    Null,
}

impl NsField {
    fn namespace(self) -> Option<&'static str> {
        match self {
            NsField::Is(ns) => Some(ns),
            NsField::Absent | NsField::Null => None,
        }
    }

    fn put(self, data: &mut Value) {
        match self {
            NsField::Is(ns) => data["namespace"] = json!(ns),
            NsField::Null => data["namespace"] = Value::Null,
            NsField::Absent => {}
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Send {
        user: &'static str,
        ns: NsField,
    },
    Broadcast {
        ns: NsField,
    },
    /// Disconnect the n-th live socket (modulo the number live): with a close, or by
    /// dropping the connection.
    Disconnect {
        nth: usize,
        graceful: bool,
    },
}

fn user() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(USERS)
}

fn joined() -> impl Strategy<Value = Joined> {
    prop_oneof![
        3 => Just(Joined::In("a")),
        3 => Just(Joined::In("b")),
        2 => Just(Joined::Absent),
        1 => Just(Joined::Empty),
    ]
}

fn ns_field() -> impl Strategy<Value = NsField> {
    prop_oneof![
        3 => Just(NsField::Is("a")),
        3 => Just(NsField::Is("b")),
        2 => Just(NsField::Absent),
        1 => Just(NsField::Null),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (user(), ns_field()).prop_map(|(user, ns)| Op::Send { user, ns }),
        3 => ns_field().prop_map(|ns| Op::Broadcast { ns }),
        2 => (any::<usize>(), any::<bool>())
            .prop_map(|(nth, graceful)| Op::Disconnect { nth, graceful }),
    ]
}

/// One client socket and what the model knows about it.
struct Member {
    user: &'static str,
    joined: Joined,
    /// None once disconnected.
    client: Option<Client>,
}

impl Member {
    fn live(&self) -> bool {
        self.client.is_some()
    }

    fn namespace(&self) -> Option<&'static str> {
        self.joined.namespace()
    }

    /// Whether the spec says `op` reaches this socket.
    fn receives(&self, op: &Op) -> bool {
        self.live()
            && match op {
                Op::Send { user, ns } => {
                    self.user == *user
                        && match ns.namespace() {
                            Some(ns) => self.namespace() == Some(ns),
                            None => true,
                        }
                }
                Op::Broadcast { ns } => match ns.namespace() {
                    Some(ns) => self.namespace() == Some(ns),
                    None => true,
                },
                Op::Disconnect { .. } => false,
            }
    }
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

/// Reads `client` up to the marker `marker`, returning the ids of the delivery frames before
/// it.
async fn read_to_marker(client: &mut Client, marker: u64) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    loop {
        let frame = match client.next(FRAME_WAIT).await {
            None => return Err(format!("marker {marker} not seen after {ids:?}")),
            Some(Event::Json(frame)) => frame,
            Some(Event::Pong) => continue,
            Some(end) => return Err(format!("socket ended before marker {marker}: {end:?}")),
        };
        let id = frame["payload"]["id"].as_u64();
        match (frame["type"].as_str(), id) {
            (Some("marker"), Some(m)) if m == marker => return Ok(ids),
            (Some("delivery"), Some(id)) if frame == delivery_frame(id) => ids.push(id),
            _ => return Err(format!("unexpected frame {frame} before marker {marker}")),
        }
    }
}

fn delivery_frame(id: u64) -> Value {
    json!({"type": "delivery", "payload": {"id": id}})
}

/// Waits until the gateway's registry holds `n` sockets.
async fn wait_for_count(gw: &Running, n: usize) -> Result<(), TestCaseError> {
    // A liveness bound, not a speed: an SSE stream that goes away is noticed when hyper
    // drops its body; with a 3 s bound this failed once on a machine busy with three builds.
    for _ in 0..1000 {
        if gw.sockets().count() == n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(fail(format!(
        "registry holds {} sockets, the model {n}",
        gw.sockets().count()
    )))
}

/// The gateway's own view of who is connected must match the model.
fn check_registry(gw: &Running, clients: &[Member]) -> Result<(), TestCaseError> {
    let live: Vec<&Member> = clients.iter().filter(|c| c.live()).collect();
    let s = gw.sockets();
    prop_assert_eq!(s.count(), live.len());
    for ns in ["a", "b"] {
        let here: Vec<&&Member> = live.iter().filter(|c| c.namespace() == Some(ns)).collect();
        prop_assert_eq!(s.count_in_namespace(ns), here.len(), "namespace {}", ns);
        let mut users: Vec<String> = here.iter().map(|c| c.user.to_string()).collect();
        users.sort();
        users.dedup();
        prop_assert_eq!(s.users_in_namespace(ns), users, "users in {}", ns);
        for user in USERS {
            let n = here.iter().filter(|c| c.user == *user).count();
            prop_assert_eq!(s.count_of_user(user, Some(ns)), n, "{} in {}", user, ns);
        }
    }
    for user in USERS {
        let n = live.iter().filter(|c| c.user == *user).count();
        prop_assert_eq!(s.count_of_user(user, None), n, "{} anywhere", user);
    }
    Ok(())
}

async fn run_case(
    kind: Kind,
    population: Vec<(&'static str, Joined)>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let gw = start(kind, container(spec_config(""))).await;
    let producer = gw.producer();
    let mut clients = Vec::new();
    for (user, joined) in population {
        let client = match joined {
            Joined::In(ns) => gw.connect(user, Some(ns)).await,
            Joined::Absent => gw.connect(user, None).await,
            Joined::Empty => gw.connect(user, Some("")).await,
        };
        clients.push(Member {
            user,
            joined,
            client: Some(client),
        });
    }
    wait_for_count(&gw, clients.len()).await?;
    check_registry(&gw, &clients)?;

    let mut closing = Vec::new();
    let mut next_id = 0u64;
    let mut id = || {
        next_id += 1;
        next_id
    };
    for (step, op) in ops.iter().enumerate() {
        let delivery = id();
        match op {
            Op::Send { user, ns } => {
                let mut data =
                    json!({"username": user, "type": "delivery", "payload": {"id": delivery}});
                ns.put(&mut data);
                producer
                    .send(SEND, data)
                    .map_err(|e| fail(format!("publish: {e}")))?;
            }
            Op::Broadcast { ns } => {
                let mut data = json!({"type": "delivery", "payload": {"id": delivery}});
                ns.put(&mut data);
                producer
                    .send(BROADCAST, data)
                    .map_err(|e| fail(format!("publish: {e}")))?;
            }
            Op::Disconnect { nth, graceful } => {
                let live: Vec<usize> = (0..clients.len()).filter(|&i| clients[i].live()).collect();
                if let Some(&i) = live.get(nth % live.len().max(1)) {
                    let mut client = clients[i].client.take().expect("live");
                    if *graceful {
                        client.close(1000).await;
                        // Keep reading so the close handshake completes. Every frame meant
                        // for it was read up to the last marker, so any message now is a
                        // delivery to a disconnected socket.
                        closing.push(tokio::spawn(async move {
                            let mut late = Vec::new();
                            while let Some(event) = client.next(FRAME_WAIT).await {
                                match event {
                                    Event::Json(frame) => late.push(frame),
                                    Event::Pong => {}
                                    _ => break,
                                }
                            }
                            late
                        }));
                    } else {
                        drop(client);
                    }
                    wait_for_count(&gw, live.len() - 1).await?;
                }
            }
        }
        check_registry(&gw, &clients)?;

        // Every live socket, read up to a fresh marker, got exactly this op's id or nothing.
        let marker = id();
        producer
            .send(
                BROADCAST,
                json!({"type": "marker", "payload": {"id": marker}}),
            )
            .map_err(|e| fail(format!("publish marker: {e}")))?;
        for (i, c) in clients.iter_mut().enumerate() {
            let want: Vec<u64> = if c.receives(op) {
                vec![delivery]
            } else {
                vec![]
            };
            let (user, joined) = (c.user, c.joined);
            let Some(client) = c.client.as_mut() else {
                continue;
            };
            let got = read_to_marker(client, marker).await.map_err(|e| {
                fail(format!(
                    "step {step} {op:?}: socket {i} ({user}, {joined:?}): {e}"
                ))
            })?;
            prop_assert_eq!(
                got,
                want,
                "step {} {:?}: socket {} ({}, {:?})",
                step,
                op,
                i,
                user,
                joined
            );
        }
    }
    for task in closing {
        let late = tokio::time::timeout(FRAME_WAIT, task)
            .await
            .map_err(|_| fail("a closed socket's close handshake never finished"))?
            .map_err(|e| fail(format!("reader task: {e}")))?;
        prop_assert!(late.is_empty(), "frames after disconnecting: {:?}", late);
    }
    drop(clients);
    gw.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// Runs the cases on the test's runtime, from a blocking thread (proptest's runner is not
/// async).
async fn deliveries_reach_exactly_the_sockets_the_spec_says(kind: Kind) {
    let runtime = tokio::runtime::Handle::current();
    let run = move || {
        let config = ProptestConfig {
            cases: 32,
            max_shrink_iters: 64,
            ..ProptestConfig::default()
        };
        let population = proptest::collection::vec((user(), joined()), 2..=8);
        let ops = proptest::collection::vec(op(), 1..=8);
        TestRunner::new(config)
            .run(&(population, ops), |(population, ops)| {
                runtime.block_on(run_case(kind, population, ops))
            })
            .map_err(|e| e.to_string())
    };
    if let Err(e) = tokio::task::spawn_blocking(run).await.unwrap() {
        panic!("{e}");
    }
}

each_transport!(deliveries_reach_exactly_the_sockets_the_spec_says);
