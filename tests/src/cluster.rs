//! A PostgreSQL cluster of a test's own: created with `initdb` in a temporary folder, on a free
//! loopback port, so a test may restart it, change passwords and end sessions without touching
//! the shared cluster other tests run on at the same time.
//!
//! `postgres` (the superuser the test administers with) connects without a password; every other
//! role needs its password, checked with `scram-sha-256` (`pg_hba.conf`), as on RDS.
//! Needs the PostgreSQL server binaries on `PATH` (`. .local/env` puts them there); when they are
//! missing the test fails and says so.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use pg_outbox::postgres::{DatabaseSettings, TlsMode};

/// A running private cluster; stopped and deleted when dropped.
pub struct PrivateCluster {
    dir: PathBuf,
    /// Its loopback port.
    pub port: u16,
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

extern "C" {
    fn geteuid() -> u32;
}

/// Runs a PostgreSQL program; as root, as the `postgres` user (the server refuses to run as root).
fn pg_command(program: &str) -> Command {
    if as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command.current_dir("/");
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e}); are the PostgreSQL server binaries on PATH? (`. .local/env`)"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl PrivateCluster {
    /// Creates and starts a cluster (about a second: `initdb --no-sync`, fsync off).
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("outbox-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("cluster folder");
        if as_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres"]).arg(&dir);
                    c
                },
                "chown the cluster folder",
            );
        }
        let data = dir.join("data");
        run(
            {
                let mut c = pg_command("initdb");
                c.arg("-D")
                    .arg(&data)
                    .args([
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-locale",
                    ])
                    .arg("--no-sync");
                c
            },
            "initdb",
        );
        let port = free_port();
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n\
             shared_buffers = 32MB\npassword_encryption = 'scram-sha-256'\n",
            dir.display()
        );
        append_as_owner(&data.join("postgresql.conf"), &conf);
        // First match wins: the administering superuser without a password, everyone else with
        // scram-sha-256.
        write_as_owner(
            &data.join("pg_hba.conf"),
            "local all postgres trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        );
        let cluster = Self { dir, port };
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut command = pg_command("pg_ctl");
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(args);
        run(command, &format!("pg_ctl {}", args.join(" ")));
    }

    /// `pg_ctl restart -m fast`: every session ends, the server is back when this returns.
    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    }

    /// Stops the server (fast shutdown); [`PrivateCluster::start_again`] brings it back.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
    }

    /// Starts a stopped server.
    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    /// The superuser's connection string for `dbname`.
    pub fn admin_url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Settings for the superuser on `dbname`.
    pub fn admin_settings(&self, dbname: &str) -> DatabaseSettings {
        DatabaseSettings::new(
            self.admin_url(dbname).parse().expect("admin url"),
            TlsMode::Disable,
        )
    }

    /// A superuser connection to `dbname`.
    pub async fn admin(&self, dbname: &str) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.admin_url(dbname), NoTls)
            .await
            .expect("connect to the private cluster as postgres");
        tokio::spawn(connection);
        client
    }

    /// Creates a login role with `password` that owns everything in `dbname` (the application's
    /// role, as on RDS).
    pub async fn create_app_role(&self, dbname: &str, role: &str, password: &str) {
        let admin = self.admin(dbname).await;
        // Identifiers and literals cannot be bind parameters; the tests pass fixed [a-z0-9_] names
        // and passwords.
        assert!(role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(password
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'));
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{password}';
                 GRANT ALL ON DATABASE {dbname} TO {role};
                 GRANT ALL ON SCHEMA public TO {role};
                 GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
                 GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
                 GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};"
            ))
            .await
            .expect("create the application role");
    }

    /// Changes `role`'s password (what a rotation's `setSecret` step does).
    pub async fn set_password(&self, role: &str, password: &str) {
        assert!(password
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'));
        self.admin("postgres")
            .await
            .batch_execute(&format!("ALTER ROLE {role} PASSWORD '{password}'"))
            .await
            .expect("change the password");
    }

    /// Ends every session of `role` (what RDS does to a rotated user's old sessions in the
    /// scenario under test) and waits until they are gone; returns how many there were.
    pub async fn terminate_sessions(&self, role: &str) -> i64 {
        let admin = self.admin("postgres").await;
        let ended: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .expect("terminate sessions")
            .get(0);
        for _ in 0..200 {
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&role],
                )
                .await
                .expect("count sessions")
                .get(0);
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ended
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

fn write_as_owner(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn append_as_owner(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let mut command = pg_command("pg_ctl");
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate", "-w"]);
        let _ = command.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
