//! Logging in as users do: mosquitto_pub/sub with `-u/-P` against password files written
//! by `mosquitto_passwd` and `ternmq passwd`, reloading them, TLS with `--cafile` and
//! client certificates, JWTs in the password field, SCRAM-SHA-256 over AUTH.

use crate::common::client::{connect_v5, filter, opts, plain, Client};
use crate::common::mosquitto::{
    clients_available, mosquitto_pub_with_input, mosquitto_sub, publish, wait_subscriptions, Proc,
    SUB_TIMEOUT_SECS,
};
use crate::common::TestBroker;
use crate::support::*;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use std::process::Command;
use ternmq::config::{IdentitySource, TlsConfig};
use ternmq::config::{Listener, ListenerKind};
use ternmq::protocol::{Auth, ByteStr, Packet, Properties, Protocol, QoS, ReasonCode};
use ternmq::security::jwt::JwtConfig;

/// A broker whose only listener refuses anonymous clients, with the password file.
async fn with_password_file(
    passwd: &std::path::Path,
    acl: Option<std::path::PathBuf>,
) -> TestBroker {
    let passwd = passwd.to_path_buf();
    TestBroker::with(move |c| {
        c.listeners[0].allow_anonymous = false;
        c.auth.password_file = Some(passwd);
        c.auth.acl_file = acl;
    })
    .await
}

/// Runs `mosquitto_pub` to its end; returns its exit status and stderr.
async fn pub_result(broker: &TestBroker, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut p = mosquitto_pub_with_input(broker, args, None);
    let status = p.wait().await;
    (status, p.stderr())
}

#[tokio::test]
async fn mosquitto_clients_log_in_with_files_from_mosquitto_passwd_and_ternmq_passwd() {
    if !clients_available() || !tools_available(&["mosquitto_passwd"]) {
        return;
    }
    let files = Files::new();
    let passwd = files.path("passwd");
    mosquitto_passwd(&passwd, "mosq2", "pw-7", true, false);
    mosquitto_passwd(&passwd, "mosq1", "pw-6", false, true);
    ternmq_passwd(&passwd, "tern", "pw-argon", false);
    ternmq_passwd(&passwd, "scram", "pw-scram", true);
    let text = std::fs::read_to_string(&passwd).unwrap();
    for (user, scheme) in [
        ("mosq2", "$7$"),
        ("mosq1", "$6$"),
        ("tern", "$argon2id$"),
        ("scram", "SCRAM-SHA-256$"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{user}:{scheme}"))),
            "{user} has a {scheme} line:\n{text}"
        );
    }
    let b = with_password_file(&passwd, None).await;

    let mut sub = mosquitto_sub(
        &b,
        &[
            "-u", "mosq2", "-P", "pw-7", "-t", "login/#", "-v", "-q", "1", "-C", "8",
        ],
    );
    wait_subscriptions(&b, 1, &mut sub).await;
    let users = [
        ("mosq2", "pw-7"),
        ("mosq1", "pw-6"),
        ("tern", "pw-argon"),
        ("scram", "pw-scram"),
    ];
    let mut expected = Vec::new();
    for (user, password) in users {
        for version in ["mqttv311", "mqttv5"] {
            let topic = format!("login/{user}");
            publish(
                &b,
                &[
                    "-u", user, "-P", password, "-V", version, "-q", "1", "-t", &topic, "-m",
                    version,
                ],
            )
            .await;
            expected.push(format!("{topic} {version}"));
        }
    }
    assert_eq!(sub.output().await, expected);

    // A wrong password: mosquitto_pub fails and says why (CONNACK 4, 3.1.1; 0x86, 5.0).
    let (status, stderr) =
        pub_result(&b, &["-u", "tern", "-P", "wrong", "-t", "x", "-m", "x"]).await;
    assert!(
        !status.success() && stderr.contains("bad user name or password"),
        "{status}: {stderr}"
    );
    let (status, stderr) = pub_result(
        &b,
        &[
            "-u", "mosq1", "-P", "wrong", "-V", "mqttv5", "-t", "x", "-m", "x",
        ],
    )
    .await;
    assert!(!status.success(), "{status}: {stderr}");
    // No credentials on a listener without allow_anonymous: refused as not authorized.
    let (status, stderr) = pub_result(&b, &["-t", "x", "-m", "x"]).await;
    assert!(
        !status.success() && stderr.contains("not authorised"),
        "{status}: {stderr}"
    );

    // The exact codes, with the raw client.
    for (protocol, bad, anonymous) in [
        (
            Protocol::V311,
            ReasonCode::BadUserNameOrPassword,
            ReasonCode::NotAuthorized,
        ),
        (
            Protocol::V5,
            ReasonCode::BadUserNameOrPassword,
            ReasonCode::NotAuthorized,
        ),
    ] {
        let wrong = login(protocol, "w", Some("mosq2"), Some("pw-6"));
        let mut c = connect_expecting(b.addr, wrong, bad).await;
        c.expect_closed(crate::common::client::WAIT).await;
        let mut c = connect_expecting(b.addr, login(protocol, "a", None, None), anonymous).await;
        c.expect_closed(crate::common::client::WAIT).await;
    }
    // 3.1.1 return codes on the wire: 4 and 5 (the client decodes them into the above).
    let mut raw = Client::open(b.addr, "raw", Protocol::V311).await;
    raw.send_raw(&connect_bytes("raw", 60)).await;
    raw.expect_bytes(&[0x20, 2, 0, 5], "CONNACK 5 (not authorized)")
        .await;
}

#[tokio::test]
async fn reload_picks_up_a_new_user_and_a_changed_acl_for_connected_clients() {
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "alice", "a-pw", false);
    ternmq_passwd(&passwd, "editor", "e-pw", false);
    let acl = files.write(
        "acl",
        "user alice\ntopic read news/#\nuser editor\ntopic write #\n",
    );
    let b = with_password_file(&passwd, Some(acl.clone())).await;
    let v5 = |id: &str, user: &str, pw: &str| login(Protocol::V5, id, Some(user), Some(pw));

    let (mut alice, _) = Client::accepted(b.addr, v5("alice", "alice", "a-pw")).await;
    alice
        .subscribe_ok(&[("news/#", QoS::AtLeastOnce), ("sports/#", QoS::AtLeastOnce)])
        .await;
    let (mut editor, _) = Client::accepted(b.addr, v5("editor", "editor", "e-pw")).await;
    editor
        .publish(plain("news/1", b"n1", QoS::AtLeastOnce))
        .await;
    editor
        .publish(plain("sports/1", b"s1", QoS::AtLeastOnce))
        .await;
    let got: Vec<_> = alice
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(got, ["news/1"]);

    // bob is added and alice's rights change; neither counts before the reload.
    ternmq_passwd(&passwd, "bob", "b-pw", false);
    std::fs::write(
        &acl,
        "user alice\ntopic read sports/#\nuser editor\ntopic write #\nuser bob\ntopic write sports/#\n",
    )
    .unwrap();
    connect_expecting(
        b.addr,
        v5("bob", "bob", "b-pw"),
        ReasonCode::BadUserNameOrPassword,
    )
    .await;

    let server = b.server.as_ref().unwrap();
    assert_eq!(server.reload(), Vec::<String>::new(), "the files reload");
    let (mut bob, _) = Client::accepted(b.addr, v5("bob", "bob", "b-pw")).await;
    editor
        .publish(plain("news/2", b"n2", QoS::AtLeastOnce))
        .await;
    editor
        .publish(plain("sports/2", b"s2", QoS::AtLeastOnce))
        .await;
    bob.publish(plain("sports/3", b"s3", QoS::AtLeastOnce))
        .await;
    let got: Vec<_> = alice
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(got, ["sports/2", "sports/3"], "alice reads by the new ACL");

    // A broken file is not loaded: the previous rules stay.
    std::fs::write(&acl, "user alice\ntopic sometimes sports/#\n").unwrap();
    let errors = server.reload();
    assert!(
        errors.len() == 1 && errors[0].contains("acl:2: unknown access type"),
        "{errors:?}"
    );
    bob.publish(plain("sports/4", b"s4", QoS::AtLeastOnce))
        .await;
    let got: Vec<_> = alice
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(got, ["sports/4"]);
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// A broker with one TLS listener (`tls`), anonymous clients allowed unless the
/// certificate names them, and `acl` if given.
async fn with_tls(tls: TlsConfig, acl: Option<std::path::PathBuf>) -> TestBroker {
    TestBroker::with(move |c| {
        c.listeners = vec![Listener {
            tls: Some(tls),
            allow_anonymous: true,
            ..Listener::new(ListenerKind::Tcp, "127.0.0.1:0".parse().unwrap())
        }];
        c.auth.acl_file = acl;
    })
    .await
}

/// `mosquitto_pub` or `mosquitto_sub` (line-buffered) to `localhost`, the name in the
/// server certificate, with `args`.
fn tls_client(tool: &str, broker: &TestBroker, args: &[&str]) -> Proc {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", tool, "-h", "localhost", "-p"])
        .arg(broker.port().to_string());
    if tool == "mosquitto_sub" {
        cmd.args(["-W", SUB_TIMEOUT_SECS]);
    }
    cmd.args(args);
    Proc::spawn(cmd, None)
}

async fn tls_publish(broker: &TestBroker, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut p = tls_client("mosquitto_pub", broker, args);
    let status = p.wait().await;
    (status, p.stderr())
}

#[tokio::test]
async fn mosquitto_clients_over_tls_with_cafile_and_a_wrong_ca_refused() {
    if !clients_available() {
        return;
    }
    let files = Files::new();
    let ca = Ca::new("ternmq test CA");
    let (cert, key) = {
        let server = ca.server();
        let chain = Leaf {
            cert: format!("{}{}", server.cert, ca.pem()),
            key: server.key,
        };
        chain.write(&files, "server")
    };
    let ca_file = files.write("ca.crt", &ca.pem());
    let other_ca = files.write("other-ca.crt", &Ca::new("another CA").pem());
    let b = with_tls(TlsConfig::new(cert, key), None).await;
    let ca_arg = ca_file.to_str().unwrap();

    let mut sub = tls_client(
        "mosquitto_sub",
        &b,
        &["--cafile", ca_arg, "-t", "tls/#", "-v", "-C", "2"],
    );
    wait_subscriptions(&b, 1, &mut sub).await;
    for version in ["mqttv311", "mqttv5"] {
        let (status, stderr) = tls_publish(
            &b,
            &[
                "--cafile", ca_arg, "-V", version, "-q", "1", "-t", "tls/x", "-m", version,
            ],
        )
        .await;
        assert!(status.success(), "{status}: {stderr}");
    }
    // Another CA: the client refuses the server's certificate; nothing is published.
    let (status, stderr) = tls_publish(
        &b,
        &[
            "--cafile",
            other_ca.to_str().unwrap(),
            "-t",
            "tls/x",
            "-m",
            "forged",
        ],
    )
    .await;
    assert!(!status.success(), "a wrong CA is refused: {stderr}");
    assert_eq!(sub.output().await, ["tls/x mqttv311", "tls/x mqttv5"]);
}

#[tokio::test]
async fn client_certificates_name_the_user_and_a_foreign_certificate_is_refused() {
    if !clients_available() {
        return;
    }
    let files = Files::new();
    let ca = Ca::new("ternmq test CA");
    let (cert, key) = ca.server().write(&files, "server");
    let ca_file = files.write("ca.crt", &ca.pem());
    let (alice_crt, alice_key) = ca.client("alice").write(&files, "alice");
    let (bob_crt, bob_key) = ca.client("bob").write(&files, "bob");
    let (eve_crt, eve_key) = Ca::new("eve's CA").client("alice").write(&files, "eve");
    let acl = files.write(
        "acl",
        "user alice\ntopic readwrite alice/#\nuser bob\ntopic read alice/#\n",
    );
    let tls = TlsConfig {
        client_ca_file: Some(ca_file.clone()),
        require_client_cert: true,
        identity_as_username: Some(IdentitySource::Cn),
        ..TlsConfig::new(cert, key)
    };
    let b = with_tls(tls, Some(acl)).await;
    let s = |p: &std::path::PathBuf| p.to_str().unwrap().to_owned();
    let (ca_arg, alice_crt, alice_key, bob_crt, bob_key) = (
        s(&ca_file),
        s(&alice_crt),
        s(&alice_key),
        s(&bob_crt),
        s(&bob_key),
    );
    let as_alice = [
        "--cafile", &ca_arg, "--cert", &alice_crt, "--key", &alice_key,
    ];
    let as_bob = ["--cafile", &ca_arg, "--cert", &bob_crt, "--key", &bob_key];

    // bob reads alice/# by his certificate; the -u he gives is not who he is.
    let mut sub_args = as_bob.to_vec();
    sub_args.extend(["-u", "alice", "-t", "alice/#", "-v", "-q", "1", "-C", "3"]);
    let mut sub = tls_client("mosquitto_sub", &b, &sub_args);
    wait_subscriptions(&b, 1, &mut sub).await;
    for (who, topic) in [
        (&as_alice, "alice/1"),
        (&as_bob, "alice/2"),
        (&as_alice, "alice/3"),
    ] {
        let mut args = who.to_vec();
        args.extend(["-q", "1", "-t", topic, "-m", "m"]);
        let (status, stderr) = tls_publish(&b, &args).await;
        // bob may not write: 3.1.1 acknowledges and drops it, as mosquitto does.
        assert!(status.success(), "{topic}: {status}: {stderr}");
    }

    // No certificate, or one from another CA (even naming alice): the handshake fails.
    let (status, _) = tls_publish(&b, &["--cafile", &ca_arg, "-t", "alice/4", "-m", "m"]).await;
    assert!(!status.success(), "no client certificate");
    let (status, _) = tls_publish(
        &b,
        &[
            "--cafile",
            &ca_arg,
            "--cert",
            &s(&eve_crt),
            "--key",
            &s(&eve_key),
            "-t",
            "alice/5",
            "-m",
            "m",
        ],
    )
    .await;
    assert!(!status.success(), "a certificate from another CA");
    // A last message from alice: the refused ones never came before it.
    let mut args = as_alice.to_vec();
    args.extend(["-q", "1", "-t", "alice/6", "-m", "m"]);
    assert!(tls_publish(&b, &args).await.0.success());
    assert_eq!(sub.output().await, ["alice/1 m", "alice/3 m", "alice/6 m"]);
}

// ---------------------------------------------------------------------------------------
// JWT in the password field
// ---------------------------------------------------------------------------------------

async fn with_jwt(jwt: JwtConfig) -> TestBroker {
    TestBroker::with(move |c| {
        c.listeners[0].allow_anonymous = false;
        c.auth.jwt = Some(jwt);
    })
    .await
}

/// A device's token: it publishes to devices/<it>/out and reads devices/<it>/in/#.
fn device_claims(user: &str, exp_offset: i64) -> serde_json::Value {
    json!({
        "sub": user,
        "exp": unix_time(exp_offset),
        "acl": {"pub": ["devices/%u/out"], "sub": ["devices/%u/in/#"]},
    })
}

fn ops_claims() -> serde_json::Value {
    json!({
        "sub": "ops",
        "exp": unix_time(600),
        "acl": {"pub": ["devices/+/in/#"], "sub": ["devices/+/out"]},
    })
}

/// What a token lets a device do, over mosquitto_pub/sub and the raw client.
async fn tokens_carry_their_acl(b: &TestBroker, sign: impl Fn(&serde_json::Value) -> String) {
    let (dev, ops) = (sign(&device_claims("dev42", 600)), sign(&ops_claims()));
    let mut sub = mosquitto_sub(
        b,
        &[
            "-u",
            "dev42",
            "-P",
            &dev,
            "-t",
            "devices/dev42/in/#",
            "-v",
            "-q",
            "1",
            "-C",
            "1",
        ],
    );
    wait_subscriptions(b, 1, &mut sub).await;
    publish(
        b,
        &[
            "-u",
            "ops",
            "-P",
            &ops,
            "-q",
            "1",
            "-t",
            "devices/dev42/in/cmd",
            "-m",
            "reboot",
        ],
    )
    .await;
    assert_eq!(sub.output().await, ["devices/dev42/in/cmd reboot"]);

    // The raw client as dev42 (no username: the token names it).
    let connect = login(Protocol::V5, "dev42", None, Some(&dev));
    let (mut c, _) = Client::accepted(b.addr, connect).await;
    c.publish_expect(
        plain("devices/dev42/out", b"ok", QoS::AtLeastOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    c.publish_expect(
        plain("devices/dev43/out", b"no", QoS::AtLeastOnce),
        ReasonCode::NotAuthorized,
    )
    .await;
    let codes = c
        .subscribe_with(
            vec![
                filter("devices/dev42/in/#", opts(QoS::AtLeastOnce)),
                filter("devices/#", opts(QoS::AtLeastOnce)),
            ],
            Properties::default(),
        )
        .await;
    assert_eq!(codes, [ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized]);
    c.disconnect().await;

    // Refused: an expired token, a token for another user than the CONNECT names.
    let expired = sign(&device_claims("dev42", -600));
    connect_expecting(
        b.addr,
        login(Protocol::V5, "x", None, Some(&expired)),
        ReasonCode::BadUserNameOrPassword,
    )
    .await;
    connect_expecting(
        b.addr,
        login(Protocol::V311, "x", Some("dev7"), Some(&dev)),
        ReasonCode::BadUserNameOrPassword,
    )
    .await;
}

#[tokio::test]
async fn jwt_hs256_with_an_acl_claim() {
    if !clients_available() {
        return;
    }
    let b = with_jwt(JwtConfig {
        secret: Some("a secret the app server shares".into()),
        ..JwtConfig::default()
    })
    .await;
    let key = EncodingKey::from_secret(b"a secret the app server shares");
    tokens_carry_their_acl(&b, |claims| sign_jwt(Algorithm::HS256, &key, claims)).await;
    // Signed with another secret.
    let forged = sign_jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"guess"),
        &ops_claims(),
    );
    connect_expecting(
        b.addr,
        login(Protocol::V5, "x", None, Some(&forged)),
        ReasonCode::BadUserNameOrPassword,
    )
    .await;
}

#[tokio::test]
async fn jwt_es256_with_a_public_key_file() {
    if !clients_available() {
        return;
    }
    let files = Files::new();
    let (private, public) = p256_key();
    let b = with_jwt(JwtConfig {
        public_key_file: Some(files.write("jwt.pem", &public)),
        ..JwtConfig::default()
    })
    .await;
    let key = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
    tokens_carry_their_acl(&b, |claims| sign_jwt(Algorithm::ES256, &key, claims)).await;
    // Another key, and HMAC with the public key as its secret (the classic forgery).
    let (other, _) = p256_key();
    let other = sign_jwt(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(other.as_bytes()).unwrap(),
        &ops_claims(),
    );
    let hmac = sign_jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(public.as_bytes()),
        &ops_claims(),
    );
    for forged in [other, hmac] {
        connect_expecting(
            b.addr,
            login(Protocol::V5, "x", None, Some(&forged)),
            ReasonCode::BadUserNameOrPassword,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// SCRAM-SHA-256 (MQTT 5 enhanced authentication)
// ---------------------------------------------------------------------------------------

const SCRAM: &str = "SCRAM-SHA-256";

fn auth_packet(data: Vec<u8>) -> Packet {
    let mut auth = Auth {
        reason: ReasonCode::ContinueAuthentication,
        ..Auth::default()
    };
    auth.properties.authentication_method = Some(ByteStr::from(SCRAM));
    auth.properties.authentication_data = Some(Bytes::from(data));
    Packet::Auth(auth)
}

/// Runs the exchange as `user` with `password`: CONNECT (client-first), AUTH
/// (server-first), AUTH (client-final), CONNACK (server-final). Returns the client and
/// the CONNACK's code; on success the server's proof is checked.
async fn scram_login(b: &TestBroker, user: &str, password: &str) -> (Client, ReasonCode) {
    let mut scram = ScramClient::new(user, password);
    let mut connect = connect_v5(&format!("scram-{user}"));
    connect.properties.authentication_method = Some(ByteStr::from(SCRAM));
    connect.properties.authentication_data = Some(Bytes::from(scram.client_first()));
    let mut c = Client::open(b.target(), user, Protocol::V5).await;
    c.send(Packet::Connect(Box::new(connect))).await;
    let server_first = match c.expect("AUTH").await {
        Packet::Auth(a) => {
            assert_eq!(a.reason, ReasonCode::ContinueAuthentication);
            assert_eq!(a.properties.authentication_method.as_deref(), Some(SCRAM));
            a.properties
                .authentication_data
                .expect("server-first-message")
        }
        other => panic!("expected AUTH, got {other:?}"),
    };
    c.send(auth_packet(scram.client_final(&server_first))).await;
    let ack = match c.expect("CONNACK").await {
        Packet::ConnAck(ack) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    if ack.code == ReasonCode::Success {
        assert_eq!(ack.properties.authentication_method.as_deref(), Some(SCRAM));
        let last = ack
            .properties
            .authentication_data
            .expect("server-final-message");
        assert!(
            scram.verifies(&last),
            "the server proves it knows the verifier"
        );
    }
    (c, ack.code)
}

/// SCRAM over the CONNECT / AUTH exchange: the user named, wrong passwords and unknown
/// users refused alike.
#[tokio::test]
async fn scram_sha_256_login_over_auth_packets() {
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "dev", "correct horse", true);
    ternmq_passwd(&passwd, "argon", "battery staple", false);
    let acl = files.write("acl", "user dev\ntopic readwrite dev/#\n");
    let b = with_password_file(&passwd, Some(acl)).await;

    let (mut c, code) = scram_login(&b, "dev", "correct horse").await;
    assert_eq!(code, ReasonCode::Success);
    // The exchange named the user: the ACL applies to it.
    c.subscribe("dev/#", QoS::AtLeastOnce).await;
    c.publish_expect(plain("dev/1", b"x", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    assert_eq!(c.expect_publish().await.topic, "dev/1");
    c.publish_expect(
        plain("other/1", b"x", QoS::AtLeastOnce),
        ReasonCode::NotAuthorized,
    )
    .await;
    c.disconnect().await;

    // A wrong password, an unknown user, a user whose line is not SCRAM: 0x87.
    for (user, password) in [
        ("dev", "wrong"),
        ("nobody", "x"),
        ("argon", "battery staple"),
    ] {
        let (mut c, code) = scram_login(&b, user, password).await;
        assert_eq!(code, ReasonCode::NotAuthorized, "{user}");
        c.expect_closed(crate::common::client::WAIT).await;
    }
    // A method the broker does not know: 0x8C.
    let mut connect = connect_v5("unknown-method");
    connect.properties.authentication_method = Some(ByteStr::from("SCRAM-SHA-1"));
    connect_expecting(b.addr, connect, ReasonCode::BadAuthenticationMethod).await;
    // SCRAM users log in with a password too.
    Client::accepted(
        b.addr,
        login(Protocol::V311, "pw", Some("dev"), Some("correct horse")),
    )
    .await;
}

/// Failed SCRAM exchanges count in the per-address backoff as failed passwords do, and
/// wait as they do: after 5 failures from an address (any mix), its next attempt waits
/// 1 s from the last failure, the one after 2 s, and so on; a success starts afresh. On
/// tokio's paused clock, in memory (every client from 127.0.0.1): exact instants.
#[tokio::test(start_paused = true)]
async fn failed_scram_logins_are_slowed_down_like_failed_passwords() {
    use tokio::time::{Duration, Instant};
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "dev", "correct horse", true);
    let b = &TestBroker::in_memory(|c| c.auth.password_file = Some(passwd));
    // A username without its password: refused without hashing, a failure all the same.
    let no_password = |i: usize| async move {
        let connect = login(Protocol::V5, &format!("no-pw-{i}"), Some("dev"), None);
        connect_expecting(b.target(), connect, ReasonCode::BadUserNameOrPassword).await;
    };
    let wrong_scram = || async {
        let (_, code) = scram_login(b, "dev", "wrong").await;
        assert_eq!(code, ReasonCode::NotAuthorized);
    };
    let t0 = Instant::now();
    let secs = |s| t0 + Duration::from_secs(s);
    for i in 0..3 {
        no_password(i).await;
    }
    wrong_scram().await;
    wrong_scram().await;
    assert_eq!(Instant::now(), t0, "5 failures, none delayed");
    // The 6th attempt, SCRAM, waits 1 s before its exchange starts.
    wrong_scram().await;
    assert_eq!(Instant::now(), secs(1));
    // The 7th, a password, 2 s more.
    no_password(7).await;
    assert_eq!(Instant::now(), secs(3));
    // Once the 4 s are over, a right SCRAM login goes ahead and forgets the failures.
    tokio::time::sleep_until(secs(7)).await;
    let (_, code) = scram_login(b, "dev", "correct horse").await;
    assert_eq!(code, ReasonCode::Success);
    assert_eq!(Instant::now(), secs(7));
    wrong_scram().await;
    assert_eq!(Instant::now(), secs(7), "counted afresh");
}

/// The code block of docs/security.md that follows the line `after`.
fn doc_block(doc: &str, after: &str) -> String {
    let start = doc
        .find(after)
        .unwrap_or_else(|| panic!("docs/security.md has {after:?}"));
    let rest = &doc[start..];
    let open = rest.find("```").unwrap();
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

/// "Opening a listener to a network: an example" of docs/security.md, as written there
/// (its acl_file and broker.toml; paths, ports and certificates made at test time), with
/// its mosquitto_pub/sub command lines.
#[tokio::test]
async fn the_worked_example_of_docs_security_md() {
    if !clients_available() {
        return;
    }
    let doc = include_str!("../../docs/security.md");
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "ops", "ops-pw", false);
    ternmq_passwd(&passwd, "sensor-1", "s1-pw", false);
    let acl = files.write(
        "acl",
        &doc_block(doc, "`/etc/ternmq/acl`, mosquitto's format:"),
    );
    let ca = Ca::new("ternmq test CA");
    let (cert, key) = ca.server().write(&files, "server");
    let ca_file = files.write("ca.crt", &ca.pem());
    let toml = doc_block(doc, "`broker.toml`:")
        .replace("/etc/ternmq/passwd", passwd.to_str().unwrap())
        .replace("/etc/ternmq/acl", acl.to_str().unwrap())
        .replace("/etc/ternmq/server.crt", cert.to_str().unwrap())
        .replace("/etc/ternmq/server.key", key.to_str().unwrap())
        .replace("127.0.0.1:1883", "127.0.0.1:0")
        .replace("0.0.0.0:8883", "127.0.0.1:0");
    let config = ternmq::Config::parse(&toml).expect("the example's broker.toml parses");
    assert!(config.listeners[1].tls.is_some() && !config.listeners[1].allow_anonymous);
    let b = TestBroker::with(move |c| *c = config).await;
    let tls_port = b.server.as_ref().unwrap().local_addrs()[1].1.port();
    let tls = |tool: &str, args: &[&str]| {
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", tool, "-h", "localhost", "-p", &tls_port.to_string()])
            .args(["--cafile", ca_file.to_str().unwrap()]);
        if tool == "mosquitto_sub" {
            cmd.args(["-W", SUB_TIMEOUT_SECS]);
        }
        cmd.args(args);
        Proc::spawn(cmd, None)
    };

    let mut ops = tls(
        "mosquitto_sub",
        &[
            "-u",
            "ops",
            "-P",
            "ops-pw",
            "-t",
            "devices/#",
            "-v",
            "-C",
            "2",
        ],
    );
    wait_subscriptions(&b, 1, &mut ops).await;
    let mut sensor = tls(
        "mosquitto_sub",
        &["-u", "sensor-1", "-P", "s1-pw", "-t", "#", "-v", "-C", "1"],
    );
    wait_subscriptions(&b, 2, &mut sensor).await;
    let reading = [
        "-u",
        "sensor-1",
        "-P",
        "s1-pw",
        "-t",
        "devices/sensor-1/reading",
        "-m",
        "21.5",
    ];
    assert!(tls("mosquitto_pub", &reading).wait().await.success());
    // Another device's topic: refused with 0x87, which mosquitto_pub reports.
    let mut forged = tls(
        "mosquitto_pub",
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "sensor-1",
            "-P",
            "s1-pw",
            "-t",
            "devices/sensor-2/reading",
            "-m",
            "0",
        ],
    );
    forged.wait().await;
    assert!(
        forged.stderr().contains("Not authorized"),
        "{}",
        forged.describe()
    );
    let command = [
        "-u",
        "ops",
        "-P",
        "ops-pw",
        "-t",
        "devices/sensor-1/command",
        "-m",
        "reboot",
        "-q",
        "1",
    ];
    assert!(tls("mosquitto_pub", &command).wait().await.success());
    assert_eq!(
        ops.output().await,
        [
            "devices/sensor-1/reading 21.5",
            "devices/sensor-1/command reboot"
        ]
    );
    assert_eq!(sensor.output().await, ["devices/sensor-1/command reboot"]);
}

/// Re-authentication (MQTT 5.0, 4.12.1) on a live connection: AUTH 0x19 with the
/// client-first message, AUTH 0x18 both ways, AUTH 0x00 with the server's proof. Returns
/// the reason of the broker's last packet: 0x00 (Success, the server proved itself) or the
/// DISCONNECT's reason when it refuses (and closes).
async fn scram_reauth(c: &mut Client, user: &str, password: &str) -> ReasonCode {
    let mut scram = ScramClient::new(user, password);
    let mut start = auth_packet(scram.client_first());
    if let Packet::Auth(a) = &mut start {
        a.reason = ReasonCode::Reauthenticate;
    }
    c.send(start).await;
    let server_first = match c.expect("AUTH").await {
        Packet::Auth(a) if a.reason == ReasonCode::ContinueAuthentication => a
            .properties
            .authentication_data
            .expect("server-first-message"),
        Packet::Disconnect(d) => return d.reason,
        other => panic!("expected AUTH, got {other:?}"),
    };
    c.send(auth_packet(scram.client_final(&server_first))).await;
    match c.expect("AUTH").await {
        Packet::Auth(a) => {
            assert_eq!(a.reason, ReasonCode::Success);
            let last = a
                .properties
                .authentication_data
                .expect("server-final-message");
            assert!(
                scram.verifies(&last),
                "the server proves it knows the verifier"
            );
            a.reason
        }
        Packet::Disconnect(d) => {
            c.expect_closed(crate::common::client::WAIT).await;
            d.reason
        }
        other => panic!("expected AUTH or DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn scram_sha_256_re_authentication_on_a_live_connection() {
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "dev", "first", true);
    ternmq_passwd(&passwd, "other", "other", true);
    let acl = files.write("acl", "user dev\ntopic readwrite dev/#\n");
    let b = with_password_file(&passwd, Some(acl.clone())).await;
    let (mut c, code) = scram_login(&b, "dev", "first").await;
    assert_eq!(code, ReasonCode::Success);
    c.subscribe("dev/#", QoS::AtLeastOnce).await;

    // The same credentials: the connection goes on.
    assert_eq!(
        scram_reauth(&mut c, "dev", "first").await,
        ReasonCode::Success
    );
    c.publish_expect(plain("dev/1", b"x", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    assert_eq!(c.expect_publish().await.topic, "dev/1");

    // The password changes and dev gets more rights: re-authenticating with the new
    // password is what a long-lived client does, and it picks up the new ACL.
    ternmq_passwd(&passwd, "dev", "second", true);
    std::fs::write(
        &acl,
        "user dev\ntopic readwrite dev/#\ntopic readwrite shared/#\n",
    )
    .unwrap();
    assert_eq!(b.server.as_ref().unwrap().reload(), Vec::<String>::new());
    assert_eq!(
        scram_reauth(&mut c, "dev", "second").await,
        ReasonCode::Success
    );
    c.publish_expect(
        plain("shared/1", b"x", QoS::AtLeastOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;

    // The old password no longer does: DISCONNECT 0x87, closed.
    assert_eq!(
        scram_reauth(&mut c, "dev", "first").await,
        ReasonCode::NotAuthorized
    );
    // Nor re-authenticating as someone else, with their right password.
    let (mut c, _) = scram_login(&b, "dev", "second").await;
    assert_eq!(
        scram_reauth(&mut c, "other", "other").await,
        ReasonCode::NotAuthorized
    );
}
