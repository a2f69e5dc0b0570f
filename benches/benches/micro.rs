//! Criterion micro-benchmarks of Switchboard's hot paths:
//!
//! - `registry`: insert/remove, lookup by id and by user, at 100k connected entries;
//! - `routing`: an inbound client message decoded and published on the in-process bus to a
//!   handler that replies (the reply encoded and queued, as the gateway does);
//! - `fanout`: one broadcast frame to 10k socket queues, encoded once and shared as `Bytes`
//!   clones (the gateway's way), against encoding once per recipient;
//! - `codec`: the RFC 6455 codec without I/O: a frame header parsed, a payload unmasked, a
//!   server frame encoded, and a stream of client frames decoded into messages.
//!
//! `cargo bench -p switchboard-bench` (add `-- registry` to run one group).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};
use switchboard::{decode_client_message, encode_frame};
use switchboard_bus::{Bus, InProcessBus, Message, Reply, ReplyTo};
use switchboard_registry::{ConnId, Registry, Target};

const ENTRIES: u64 = 100_000;
const FANOUT: usize = 10_000;

fn filled_registry() -> (Registry<u64>, Vec<ConnId>) {
    let reg = Registry::new();
    let ids = (0..ENTRIES)
        .map(|i| {
            let ns = format!("ns-{}", i % 10);
            reg.insert(&format!("user-{i}"), Some(&ns), i)
        })
        .collect();
    (reg, ids)
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    let (reg, ids) = filled_registry();
    let users: Vec<String> = (0..ENTRIES).map(|i| format!("user-{i}")).collect();

    g.throughput(Throughput::Elements(1));
    g.bench_function("insert+remove at 100k", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let id = reg.insert("newcomer", Some("ns-0"), i);
            black_box(reg.remove(id));
        })
    });
    g.bench_function("get by id at 100k", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % ids.len();
            black_box(reg.get(ids[i]).map(|e| e.handle))
        })
    });
    g.bench_function("for_each user at 100k", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % users.len();
            let mut hits = 0u64;
            reg.for_each(Target::User(&users[i]), |_, h| hits += *h);
            black_box(hits)
        })
    });
    g.bench_function("for_each user in namespace at 100k", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % users.len();
            let ns = format!("ns-{}", i % 10);
            let mut hits = 0u64;
            reg.for_each(Target::UserInNamespace(&users[i], &ns), |_, h| hits += *h);
            black_box(hits)
        })
    });
    g.sample_size(10);
    g.throughput(Throughput::Elements(ENTRIES));
    g.bench_function("fill 100k", |b| {
        b.iter_batched(
            Registry::<u64>::new,
            |reg| {
                for (i, user) in users.iter().enumerate() {
                    reg.insert(user, Some("ns-0"), i as u64);
                }
                reg
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A socket's way back, as the gateway builds it: encode the reply, queue the frame.
struct QueueReplies(flume::Sender<Bytes>);

impl ReplyTo for QueueReplies {
    fn deliver(&self, topic: &str, reply: Reply) {
        if let Reply::Ok(payload) = reply {
            let _ = self.0.try_send(encode_frame(topic, &payload));
        }
    }
}

/// A client message's type and its payload as raw JSON text, borrowed from the frame.
#[derive(serde::Deserialize)]
struct RawParts<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
}

fn routing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _inside = runtime.enter();
    let bus = Arc::new(InProcessBus::new());
    bus.subscribe(
        "bench:echo",
        Arc::new(|msg: Message| async move {
            msg.reply(&msg.data()["payload"]);
        }),
    )
    .expect("subscribe");
    let (tx, rx) = flume::bounded::<Bytes>(1024);
    let replies: Arc<dyn ReplyTo> = Arc::new(QueueReplies(tx));
    let topic: Arc<str> = Arc::from("bench:echo");
    let text = Bytes::from(format!(
        r#"{{"type":"echo","payload":"{}"}}"#,
        "x".repeat(64)
    ));

    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(decode_client_message(black_box(&text)).is_ok()))
    });
    // Not what the gateway does: what decoding costs when the payload is kept as raw JSON
    // text (validated, not built into a `Value`), the next step that docs/PERFORMANCE.md
    // weighs for `send` and `echo`.
    g.bench_function("decode type and raw payload (borrowed)", |b| {
        b.iter(|| {
            let parts: RawParts<'_> = serde_json::from_slice(black_box(&text)).expect("valid");
            black_box((parts.kind.len(), parts.payload.map(|p| p.get().len())))
        })
    });
    g.bench_function("decode+publish+reply", |b| {
        b.iter(|| {
            let msg = decode_client_message(black_box(&text)).expect("valid");
            let data = Arc::new(msg.into_data());
            bus.publish(
                Message::new(topic.clone(), Value::Null)
                    .with_shared_data(data)
                    .with_reply_to(replies.clone()),
            )
            .expect("published");
            black_box(rx.try_recv().ok())
        })
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let reg: Registry<flume::Sender<Bytes>> = Registry::new();
    let mut outboxes = Vec::with_capacity(FANOUT);
    for i in 0..FANOUT {
        let (tx, rx) = flume::bounded(256);
        reg.insert(&format!("user-{i}"), Some("bench"), tx);
        outboxes.push(rx);
    }
    let payload = json!("x".repeat(64));
    let drain = |outboxes: &[flume::Receiver<Bytes>]| {
        for rx in outboxes {
            while rx.try_recv().is_ok() {}
        }
    };

    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(FANOUT as u64));
    g.sample_size(30);
    // Only the fan-out is timed; emptying the queues afterwards is not.
    let timed = |iters: u64, per_recipient: bool| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let t = Instant::now();
            if per_recipient {
                reg.for_each(Target::All, |_, tx| {
                    let _ = tx.try_send(encode_frame("bench.broadcast", &payload));
                });
            } else {
                let frame = encode_frame("bench.broadcast", &payload);
                reg.for_each(Target::All, |_, tx| {
                    let _ = tx.try_send(frame.clone());
                });
            }
            total += t.elapsed();
            drain(&outboxes);
        }
        total
    };
    g.bench_function("broadcast to 10k, encode once", |b| {
        b.iter_custom(|iters| timed(iters, false))
    });
    g.bench_function("broadcast to 10k, encode per recipient", |b| {
        b.iter_custom(|iters| timed(iters, true))
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    use switchboard_transport::codec::{encode_client_frame, encode_frame, parse_head, unmask};
    use switchboard_transport::codec::{Decoder, Event, TEXT};
    let mut g = c.benchmark_group("codec");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let small = encode_client_frame(
        true,
        TEXT,
        br#"{"type":"echo","payload":"0123456789abcdef"}"#,
        mask,
    );
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse a frame header", |b| {
        b.iter(|| black_box(parse_head(black_box(&small))))
    });
    for size in [64usize, 16 * 1024] {
        let mut payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("unmask {size} B"), |b| {
            b.iter(|| unmask(black_box(&mut payload), mask))
        });
        let body = vec![b'y'; size];
        g.bench_function(format!("encode a {size} B server frame"), |b| {
            b.iter_batched_ref(
                || bytes::BytesMut::with_capacity(size + 10),
                |buf| encode_frame(TEXT, black_box(&body), buf),
                BatchSize::SmallInput,
            )
        });
    }
    // 100 small messages in one read, as a busy client sends them.
    let stream: Vec<u8> = (0..100).flat_map(|_| small.clone()).collect();
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode 100 small messages from one read", |b| {
        let mut decoder = Decoder::new(64 * 1024);
        b.iter_batched_ref(
            || stream.clone(),
            |bytes| {
                let mut n = 0;
                decoder
                    .feed(bytes, &mut |e| {
                        n += usize::from(matches!(e, Event::Text(_) | Event::Message { .. }))
                    })
                    .unwrap();
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, registry, routing, fanout, codec);
criterion_main!(benches);
