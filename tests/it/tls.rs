//! TLS to PostgreSQL with `verify-full`: a throwaway cluster started for this test with a server
//! certificate signed by a CA generated at test time. The right CA and host name connect; a wrong
//! CA or a wrong host name is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use pg_outbox::config::Secret;
use pg_outbox::postgres::{DatabaseSettings, TlsMode};

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `openssl` making a CA, and a server certificate for `localhost` signed by it.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN=outbox test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

/// A PostgreSQL cluster of its own, TLS only, stopped when dropped.
struct TlsCluster {
    dir: PathBuf,
    port: u16,
}

fn as_postgres(program: &Path) -> Command {
    // PostgreSQL refuses to run as root: run it as the postgres user then.
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn pg_bin(name: &str) -> PathBuf {
    let output = Command::new("pg_config").arg("--bindir").output();
    let from_pg_config = output
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(name))
        .filter(|p| p.exists());
    from_pg_config.unwrap_or_else(|| PathBuf::from(name))
}

impl TlsCluster {
    fn start(certs: &Path) -> Self {
        let dir =
            std::env::temp_dir().join(format!("outbox-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").args(["postgres"]).arg(&dir).output();
        let data = dir.join("data");
        run(as_postgres(&pg_bin("initdb")).arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
        ]));
        for file in ["server.crt", "server.key"] {
            std::fs::copy(certs.join(file), data.join(file)).unwrap();
            let _ = Command::new("chown")
                .arg("postgres")
                .arg(data.join(file))
                .output();
        }
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nssl = on\n",
            dir.display()
        );
        let mut postgresql_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), postgresql_conf).unwrap();
        // TLS only: a plain connection has no pg_hba line to match.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        run(as_postgres(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "start"]));
        Self { dir, port }
    }

    fn settings(&self, host: &str, tls: TlsMode, ca: Option<Vec<u8>>) -> DatabaseSettings {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        let settings = DatabaseSettings::new(config, tls);
        match ca {
            Some(pem) => settings.with_extra_root(Secret::new(pem)),
            None => settings,
        }
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn verify_full_accepts_the_right_ca_and_host_and_refuses_the_rest() {
    let certs = tempdir();
    make_certificates(&certs);
    let cluster = TlsCluster::start(&certs);
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let other_ca = std::fs::read(certs.join("other-ca.pem")).unwrap();

    let client = cluster
        .settings("localhost", TlsMode::VerifyFull, Some(ca.clone()))
        .connect()
        .await
        .expect("the right CA and host name connect");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the connection is encrypted");

    let wrong_ca = cluster
        .settings("localhost", TlsMode::VerifyFull, Some(other_ca))
        .connect()
        .await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from another CA must be refused"
    );
    let wrong_host = cluster
        .settings("127.0.0.1", TlsMode::VerifyFull, Some(ca))
        .connect()
        .await;
    assert!(
        wrong_host.is_err(),
        "a certificate for another host name must be refused"
    );
    let untrusted = cluster
        .settings("localhost", TlsMode::VerifyFull, None)
        .connect()
        .await;
    assert!(
        untrusted.is_err(),
        "a CA that is not trusted must be refused"
    );
    // Plain text only when asked for, and this server does not take it.
    let plain = cluster
        .settings("localhost", TlsMode::Disable, None)
        .connect()
        .await;
    assert!(plain.is_err());
    let _ = std::fs::remove_dir_all(certs);
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-certs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
