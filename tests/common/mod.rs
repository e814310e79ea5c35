//! Shared by the integration test binaries: an in-process broker on a free port.
#![allow(dead_code)]

pub mod binary;
pub mod browser;
pub mod client;
pub mod damage;
pub mod http;
pub mod mosquitto;
pub mod rng;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use ternmq::config::{Config, Listener, ListenerKind};
use ternmq::{Broker, Server};
use tokio::io::DuplexStream;

/// A broker listening on 127.0.0.1 with an OS-chosen port, or one without listeners
/// (`in_memory`); stopped when dropped.
pub struct TestBroker {
    pub server: Option<Server>,
    broker: Arc<Broker>,
    pub addr: SocketAddr,
}

/// Serves a new in-memory connection to `broker`; returns the client's end.
pub fn connect_in_memory(broker: &Arc<Broker>) -> DuplexStream {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let broker = broker.clone();
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        let (r, w) = tokio::io::split(server);
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        ternmq::conn::serve(&broker, r, w, ternmq::conn::Peer::new(peer), false).await;
    });
    client
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
        auth_methods: Vec<std::sync::Arc<dyn ternmq::security::enhanced::AuthMethod>>,
    ) -> TestBroker {
        init_logs();
        let mut config = Config {
            listeners: vec![Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Tcp, "127.0.0.1:0".parse().unwrap())
            }],
            // No $SYS task unless a test asks: its retained messages and its task would
            // show in what other tests count.
            sys_interval: 0,
            ..Config::default()
        };
        tweak(&mut config);
        let server = Server::start_with(config, auth_methods)
            .await
            .expect("broker starts");
        let addr = server.local_addr(ListenerKind::Tcp).expect("tcp listener");
        TestBroker {
            broker: server.broker().clone(),
            server: Some(server),
            addr,
        }
    }

    /// A broker without sockets, for tests on tokio's paused clock: clients reach it
    /// through `target()`.
    pub fn in_memory(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        init_logs();
        let mut config = Config::default();
        tweak(&mut config);
        TestBroker {
            broker: Broker::new(config, Vec::new()).expect("broker starts"),
            server: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// Where clients connect: the tcp listener, or the broker itself when in memory.
    pub fn target(&self) -> client::Target {
        match self.server {
            Some(_) => client::Target::Tcp(self.addr),
            None => client::Target::Memory(self.broker.clone()),
        }
    }

    /// A broker with a tcp and a ws listener (default path `/mqtt`); `tweak` may change
    /// both, the ws one being `config.listeners[1]`.
    pub async fn with_ws(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        Self::with(|config| {
            let bind = "127.0.0.1:0".parse().unwrap();
            config.listeners.push(Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Ws, bind)
            });
            tweak(config);
        })
        .await
    }

    /// A broker with a tcp and an http listener (anonymous clients allowed); `tweak`
    /// may change both, the http one being `config.listeners[1]`.
    pub async fn with_http(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        Self::with(|config| {
            let bind = "127.0.0.1:0".parse().unwrap();
            config.listeners.push(Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Http, bind)
            });
            tweak(config);
        })
        .await
    }

    /// The address of the http listener (see `with_http`).
    pub fn http_addr(&self) -> SocketAddr {
        let server = self.server.as_ref().expect("running");
        server
            .local_addr(ListenerKind::Http)
            .expect("http listener")
    }

    /// Where clients connect over WebSocket (see `with_ws`).
    pub fn ws_target(&self) -> client::Target {
        client::Target::Ws(self.ws_addr())
    }

    /// The address of the ws listener (see `with_ws`).
    pub fn ws_addr(&self) -> SocketAddr {
        let server = self.server.as_ref().expect("running");
        server.local_addr(ListenerKind::Ws).expect("ws listener")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
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
        self.broker.begin_shutdown();
    }
}

/// Logs to the test's captured output when RUST_LOG is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
