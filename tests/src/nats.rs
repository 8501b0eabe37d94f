//! A NATS server with JetStream of a test's own (`NATS_SERVER_BIN`, installed by
//! `scripts/dev-env`): its own port and store, so a test can fill, kill and restart it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use pg_outbox::nats::{NatsSettings, StreamSpec};

/// A running `nats-server -js`, killed when dropped.
pub struct PrivateNats {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        panic!("NATS_SERVER_BIN is not set: run the tests through `make test` (scripts/dev-env installs nats-server)")
    })
}

impl PrivateNats {
    /// Starts a server on a free port with a fresh JetStream store.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("outbox-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("store folder");
        let mut server = Self {
            child: None,
            port,
            dir,
        };
        server.run().await;
        server
    }

    async fn run(&mut self) {
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Publisher settings for this server.
    pub fn settings(&self, prefix: &str) -> NatsSettings {
        NatsSettings {
            url: self.url(),
            subject_prefix: prefix.to_owned(),
            ack_timeout: Duration::from_secs(2),
            credentials_file: None,
        }
    }

    /// Kills the server at once (SIGKILL: nothing flushed on the way out).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    /// A JetStream context on a new connection.
    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(
            async_nats::connect(self.url())
                .await
                .expect("connect to nats-server"),
        )
    }

    /// Creates the stream `name` on `<prefix>.>`.
    pub async fn stream(&self, name: &str, prefix: &str, max_messages: Option<i64>) {
        pg_outbox::nats::ensure_stream(
            &self.jetstream().await,
            &StreamSpec {
                name: name.to_owned(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window: Duration::from_secs(120),
                max_messages,
                max_age: None,
            },
        )
        .await
        .expect("create stream");
    }

    /// Every message of `stream`, in stream order.
    pub async fn messages(&self, stream: &str) -> Vec<async_nats::jetstream::Message> {
        use futures_util::StreamExt;
        let js = self.jetstream().await;
        let stream = js.get_stream(stream).await.expect("stream");
        let count = stream.get_info().await.expect("info").state.messages as usize;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("ephemeral consumer");
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .expect("fetch");
            let before = out.len();
            while let Some(m) = batch.next().await {
                out.push(m.expect("message"));
            }
            assert!(
                out.len() > before,
                "stream {count} messages, read {}",
                out.len()
            );
        }
        out
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
