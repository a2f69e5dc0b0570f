//! What a production deployment needs: a cluster to fail over in, TLS with a private CA and
//! client certificates, and each kind of credential (user/password, token, NKey, `.creds`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use switchboard::Message;
use switchboard_bus::Bus;
use switchboard_bus_nats::{NatsAuth, NatsBus, NatsError, NatsOptions, NatsTls};

use crate::support::*;
use crate::{gateway_on, Gateway};

/// Sends `{"type": "x", "payload": tag}` until the handler's echo comes back (answers flow
/// again once the node's and the handler's interest has crossed the cluster).
async fn until_answered(ws: &mut Ws, tag: &str) {
    for _ in 0..100 {
        send(ws, json!({"type": "x", "payload": tag})).await;
        let frame = recv(ws).await;
        if frame == json!({"type": "socket:generalMessage", "payload": tag}) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no answer to {tag}");
}

/// Publishes `body` on `subject` from `client` until `ws` receives a frame of `kind`.
async fn until_delivered(client: &async_nats::Client, subject: &str, body: Value, ws: &mut Ws) {
    let kind = body["type"].clone();
    for _ in 0..100 {
        client
            .publish(subject.to_string(), body.to_string().into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        if let Ok(Some(Ok(m))) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(ws),
        )
        .await
        {
            if let Ok(text) = m.to_text() {
                let frame: Value = serde_json::from_str(text).unwrap_or_default();
                if frame["type"] == kind {
                    return;
                }
            }
        }
    }
    panic!("{subject} never reached the socket");
}

/// An echoing handler process.
async fn echo_handler(options: NatsOptions) -> NatsBus {
    let bus = NatsBus::connect(options).await.unwrap();
    bus.subscribe(
        "socket:generalMessage",
        Arc::new(|m: Message| async move { m.reply(m.data()["payload"].clone()) }),
    )
    .unwrap();
    bus.subscriptions_ready().await.unwrap();
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_to_another_cluster_member_without_dropping_sockets() {
    let mut cluster = NatsCluster::start(3);
    let gw = gateway_on(NatsOptions::cluster(cluster.urls()), |_| {}).await;
    let on = gw.bus.connected_server().unwrap();
    let port: u16 = on.rsplit(':').next().unwrap().parse().unwrap();
    // the handler and an outside publisher on the members the node is not connected to
    let others: Vec<String> = cluster
        .servers
        .iter()
        .filter(|s| s.port() != port)
        .map(NatsServer::url)
        .collect();
    let _handler = echo_handler(NatsOptions::new(&others[0])).await;
    let publisher = async_nats::connect(&others[1]).await.unwrap();
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", Some("acme")).await;
    until_answered(&mut ws, "before").await;

    cluster.member(port).stop();
    wait_until(
        || gw.bus.connected_server().is_some_and(|s| s != on),
        "the node to reconnect to another member",
    )
    .await;
    until_answered(&mut ws, "after").await;
    let send_body = json!({"username": "alex", "namespace": "acme", "type": "sent", "payload": 1});
    until_delivered(&publisher, "socket:send", send_body, &mut ws).await;
    let broadcast = json!({"type": "everyone", "payload": 2});
    until_delivered(&publisher, "socket:broadcast", broadcast, &mut ws).await;
    assert_eq!(gw.running.sockets().count(), 1, "the socket never dropped");

    // a node whose first listed server is down starts on another member
    let mut urls = vec![format!("nats://127.0.0.1:{port}")];
    urls.extend(others);
    let late = NatsBus::connect(NatsOptions::cluster(urls)).await.unwrap();
    assert!(late.connected_server().is_some_and(|s| s != on));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(vec!["gw-1".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server.0),
        server_key: write("server-key.pem", &server.1),
        client_cert: write("client.pem", &client.0),
        client_key: write("client-key.pem", &client.1),
    }
}

fn write_conf(dir: &Path, text: &str) -> String {
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let conf = write_conf(
        dir.path(),
        &format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    );
    let nats = NatsServer::start_with(&["-c", &conf]);
    let mut tls = NatsTls::with_ca(&pki.ca);
    tls.cert_file = Some(pki.client_cert.clone());
    tls.key_file = Some(pki.client_key.clone());
    let options = || {
        let mut o = NatsOptions::new(nats.url());
        o.tls = Some(tls.clone());
        o
    };
    let _handler = echo_handler(options()).await;
    let gw: Gateway = gateway_on(options(), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    until_answered(&mut ws, "over tls").await;

    // without the client certificate, or without trusting the CA, no connection
    let mut no_cert = NatsOptions::new(nats.url());
    no_cert.tls = Some(NatsTls::with_ca(&pki.ca));
    let refused = NatsBus::connect(no_cert).await.unwrap_err();
    assert!(matches!(refused, NatsError::Connect { .. }), "{refused}");
    let mut untrusted = options();
    untrusted.tls.as_mut().unwrap().ca_file = None;
    let refused = NatsBus::connect(untrusted).await.unwrap_err();
    assert!(matches!(refused, NatsError::Connect { .. }), "{refused}");
    // a missing file is named
    let mut missing = options();
    missing.tls.as_mut().unwrap().ca_file = Some(dir.path().join("nope.pem"));
    let err = NatsBus::connect(missing).await.unwrap_err().to_string();
    assert!(
        err.contains("tls.ca_file") && err.contains("nope.pem"),
        "{err}"
    );
}

/// Connects with `auth` and checks the connection works: an answerable event published by
/// this bus is answered by a handler on the same bus, through the server.
async fn round_trip(nats: &NatsServer, auth: NatsAuth) -> Result<(), NatsError> {
    let mut options = NatsOptions::new(nats.url());
    options.auth = auth;
    round_trip_with(options).await
}

async fn round_trip_with(options: NatsOptions) -> Result<(), NatsError> {
    let bus = NatsBus::connect(options).await?;
    bus.subscribe(
        "auth.check",
        Arc::new(|m: Message| async move { m.reply("ok") }),
    )
    .unwrap();
    bus.subscriptions_ready().await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    struct Once(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>);
    impl switchboard_bus::ReplyTo for Once {
        fn deliver(&self, _: &str, _: switchboard_bus::Reply) {
            if let Some(tx) = self.0.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    }
    bus.publish(Message::new("auth.check", Value::Null).with_reply_to(Arc::new(Once(tx))))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("an answer")
        .unwrap();
    Ok(())
}

fn assert_refused(result: Result<(), NatsError>) {
    match result {
        Err(NatsError::Connect { reason, .. }) => {
            assert!(reason.to_lowercase().contains("authorization"), "{reason}")
        }
        other => panic!("expected an authorization failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token() {
    let nats = NatsServer::start_with(&["--user", "gw", "--pass", "s3cret-pass"]);
    let user = |password: &str| NatsAuth::UserPassword {
        user: "gw".into(),
        password: password.into(),
    };
    round_trip(&nats, user("s3cret-pass")).await.unwrap();
    assert_refused(round_trip(&nats, user("wrong")).await);
    assert_refused(round_trip(&nats, NatsAuth::None).await);

    // In the URL, as CONFIG.md allows: taken from it (percent-escapes decoded), never
    // handed to the client inside the URL it logs, and never shown in an error.
    let in_url =
        |userinfo: &str| NatsOptions::new(format!("nats://{userinfo}@127.0.0.1:{}", nats.port()));
    round_trip_with(in_url("gw:s3cret%2Dpass")).await.unwrap();
    let refused = round_trip_with(in_url("gw:wrong-pass")).await;
    assert!(
        !format!("{refused:?}").contains("wrong-pass"),
        "{refused:?}"
    );
    assert_refused(refused);
    // Given twice (in the URL and in `auth`), or differently in two URLs: which one counts
    // would be a guess.
    let mut twice = in_url("gw:s3cret-pass");
    twice.auth = user("s3cret-pass");
    let e = round_trip_with(twice).await.unwrap_err().to_string();
    assert!(e.contains("both in a server URL and in `auth`"), "{e}");
    let two = NatsOptions::cluster([
        format!("nats://gw:a@127.0.0.1:{}", nats.port()),
        format!("nats://gw:b@127.0.0.1:{}", nats.port()),
    ]);
    let e = round_trip_with(two).await.unwrap_err().to_string();
    assert!(
        e.contains("different credentials") && !e.contains("gw:a"),
        "{e}"
    );

    let nats = NatsServer::start_with(&["--auth", "t0ken-t0ken"]);
    round_trip(&nats, NatsAuth::Token("t0ken-t0ken".into()))
        .await
        .unwrap();
    assert_refused(round_trip(&nats, NatsAuth::Token("wrong".into())).await);
    let token_url = format!("nats://t0ken-t0ken@127.0.0.1:{}", nats.port());
    round_trip_with(NatsOptions::new(token_url)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed() {
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = write_conf(
        dir.path(),
        &format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    );
    let nats = NatsServer::start_with(&["-c", &conf]);
    round_trip(&nats, NatsAuth::NKeySeed(user.seed().unwrap()))
        .await
        .unwrap();
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    assert_refused(round_trip(&nats, NatsAuth::NKeySeed(stranger)).await);
    let err = round_trip(&nats, NatsAuth::NKeySeed("SUNOTASEED".into()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nkey_seed"), "{err}");
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, kind: &str, mut nats: Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    nats["type"] = kind.into();
    nats["version"] = 2.into();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": format!("{kind}{now}{}", &subject[..8]),
        "iat": now,
        "iss": issuer.public_key(),
        "name": kind,
        "sub": subject,
        "nats": nats,
    });
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64(&signature))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1});
    let operator_jwt = jwt(&operator, &operator.public_key(), "operator", json!({}));
    let mut account_limits = unlimited.clone();
    for k in ["conn", "leaf", "imports", "exports"] {
        account_limits[k] = (-1).into();
    }
    account_limits["wildcards"] = true.into();
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "account",
        json!({"limits": account_limits}),
    );
    let mut user_claims = unlimited;
    user_claims["pub"] = json!({});
    user_claims["sub"] = json!({});
    let user_jwt = jwt(&account, &user.public_key(), "user", user_claims);

    let dir = tempfile::tempdir().unwrap();
    let conf = write_conf(
        dir.path(),
        &format!(
            "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n}}\n",
            account.public_key()
        ),
    );
    let nats = NatsServer::start_with(&["-c", &conf]);
    let creds = dir.path().join("gw.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    round_trip(&nats, NatsAuth::CredsFile(creds)).await.unwrap();
    assert_refused(round_trip(&nats, NatsAuth::NKeySeed(user.seed().unwrap())).await);
    let err = round_trip(&nats, NatsAuth::CredsFile(dir.path().join("none.creds")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("creds_file"), "{err}");
}
