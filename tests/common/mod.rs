//! Shared by the integration test binaries: an in-process broker on a free port.
#![allow(dead_code)]

pub mod client;
pub mod mosquitto;

use std::net::SocketAddr;
use std::time::Duration;
use ternmq::config::{Config, Listener, ListenerKind};
use ternmq::Server;

/// A broker listening on 127.0.0.1 with an OS-chosen port; stopped when dropped.
pub struct TestBroker {
    pub server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::with(|_| {}).await
    }

    /// Starts a broker after letting `tweak` change the default configuration.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        Self::with_auth(tweak, Vec::new()).await
    }

    /// `with`, and MQTT 5 enhanced authentication methods.
    pub async fn with_auth(
        tweak: impl FnOnce(&mut Config),
        auth_methods: Vec<std::sync::Arc<dyn ternmq::auth::AuthMethod>>,
    ) -> TestBroker {
        init_logs();
        let mut config = Config {
            listeners: vec![Listener::new(
                ListenerKind::Tcp,
                "127.0.0.1:0".parse().unwrap(),
            )],
            ..Config::default()
        };
        tweak(&mut config);
        let server = Server::start_with(config, auth_methods)
            .await
            .expect("broker starts");
        let addr = server.local_addr(ListenerKind::Tcp).expect("tcp listener");
        TestBroker {
            server: Some(server),
            addr,
        }
    }

    /// A broker with a tcp and a ws listener (default path `/mqtt`); `tweak` may change
    /// both, the ws one being `config.listeners[1]`.
    pub async fn with_ws(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        Self::with(|config| {
            let bind = "127.0.0.1:0".parse().unwrap();
            config.listeners.push(Listener::new(ListenerKind::Ws, bind));
            tweak(config);
        })
        .await
    }

    /// The address of the ws listener (see `with_ws`).
    pub fn ws_addr(&self) -> SocketAddr {
        let server = self.server.as_ref().expect("running");
        server.local_addr(ListenerKind::Ws).expect("ws listener")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn broker(&self) -> &std::sync::Arc<ternmq::Broker> {
        self.server.as_ref().expect("running").broker()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            assert!(
                s.shutdown(Duration::from_secs(5)).await,
                "broker stops in time"
            );
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.broker().begin_shutdown();
        }
    }
}

/// Logs to the test's captured output when RUST_LOG is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
