//! A PostgreSQL primary with a streaming standby, both throwaway clusters of this machine's
//! version (`pg_createcluster`, the standby made with `pg_basebackup -R`), and the failover
//! between them: the primary killed, the standby promoted, the old primary rebuilt as the new
//! standby so the run can fail over again.

use anyhow::{Context as _, bail};
use std::time::Duration;
use tokio::process::Command;

/// The two clusters; `hosts[primary]` is the primary now. Or a database server the harness was
/// given (`Pair::given`): one host, both entries the same, never failed over nor removed.
pub struct Pair {
    version: String,
    names: [String; 2],
    /// Their host.
    pub host: String,
    /// Their ports.
    pub ports: [u16; 2],
    /// Which of the two is the primary now.
    pub primary: usize,
    /// Who the harness and the workers connect as, and the password if any, as a URL has them
    /// (percent-encoded; psql is given them decoded).
    pub user: String,
    pub password: Option<String>,
    /// The database to connect to for what is not the run's own (creating it).
    admin_database: String,
    /// Whether the harness made the clusters (and may fail them over and remove them).
    controlled: bool,
}

/// A URL's user or password as it is (`p%40ss` is `p@ss`): a `%` not followed by two hex digits
/// stays as it is.
fn decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Pair {
    /// Creates the primary and its standby, and the database `database` on the primary.
    pub async fn create(tag: &str, database: &str) -> anyhow::Result<Pair> {
        let version = std::fs::read_dir("/etc/postgresql")
            .context("PostgreSQL's clusters (pg_createcluster) are configured in /etc/postgresql")?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .max()
            .context("no PostgreSQL version in /etc/postgresql")?;
        let pair = Pair {
            version,
            names: [format!("{tag}a"), format!("{tag}b")],
            host: "127.0.0.1".into(),
            ports: [free_port(), free_port()],
            primary: 0,
            user: "postgres".into(),
            password: None,
            admin_database: "postgres".into(),
            controlled: true,
        };
        for i in 0..2 {
            let port = pair.ports[i].to_string();
            let name = &pair.names[i];
            run(
                "pg_createcluster",
                &[&pair.version, name, "-p", &port, "--", "--auth=trust"],
            )
            .await?;
        }
        // Synchronous replication: a commit returns once the standby has it, so a failover loses
        // no committed transaction (asynchronous replication loses the last ones: a soak run
        // with it lost a stored dead letter and a recorded outcome at a failover). A promoted
        // primary runs alone until the old one is rebuilt as its standby, then is synchronous
        // again (see `fail_over`).
        for i in 0..2 {
            let conf = format!(
                "/etc/postgresql/{}/{}/conf.d/soak.conf",
                pair.version, pair.names[i]
            );
            std::fs::write(&conf, "wal_keep_size = '256MB'\nmax_connections = 200\n")
                .with_context(|| format!("cannot write {conf}"))?;
        }
        run("pg_ctlcluster", &[&pair.version, &pair.names[0], "start"]).await?;
        pair.sql(0, "postgres", &format!("CREATE DATABASE {database}"))
            .await?;
        // Written before the first standby's base backup, which copies it, so that every
        // primary, the first standby once promoted included, is synchronous (set after it, the
        // first promotion made replication asynchronous for the rest of the run, and a later
        // failover lost a recorded outcome: seed 9's 60-minute run). Loaded on the primary only
        // once its standby streams: a synchronous primary without one waits forever.
        pair.sql(
            0,
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        )
        .await?;
        pair.rebuild_standby(1).await?;
        pair.sql(0, "postgres", "SELECT pg_reload_conf()").await?;
        Ok(pair)
    }

    /// A database server the harness was given, as a `postgres://` URL it may create and drop a
    /// database on: the run's database `database` is made afresh there (an earlier run's is
    /// replaced) and left at the end, for a look at what the run did.
    pub async fn given(url: &str, database: &str) -> anyhow::Result<Pair> {
        let parsed = reqwest::Url::parse(url).context("--database-url is not a URL")?;
        let host = parsed
            .host_str()
            .context("--database-url names no host")?
            .to_owned();
        let port = parsed.port().unwrap_or(5432);
        let user = match parsed.username() {
            "" => "postgres".to_owned(),
            user => user.to_owned(),
        };
        let admin = parsed.path().trim_start_matches('/');
        let pair = Pair {
            version: String::new(),
            names: [String::new(), String::new()],
            host,
            ports: [port, port],
            primary: 0,
            user,
            password: parsed.password().map(str::to_owned),
            admin_database: if admin.is_empty() {
                "postgres".into()
            } else {
                admin.to_owned()
            },
            controlled: false,
        };
        let admin = pair.admin_database.clone();
        pair.sql(
            0,
            &admin,
            &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        )
        .await?;
        pair.sql(0, &admin, &format!("CREATE DATABASE {database}"))
            .await?;
        Ok(pair)
    }

    fn data_dir(&self, i: usize) -> String {
        format!("/var/lib/postgresql/{}/{}", self.version, self.names[i])
    }

    /// Runs `sql` on host `i`.
    pub async fn sql(&self, i: usize, database: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.ports[i].to_string();
        let mut psql = Command::new("psql");
        if let Some(password) = &self.password {
            psql.env("PGPASSWORD", decoded(password));
        }
        let user = decoded(&self.user);
        let out = psql
            .args([
                "-w",
                "-h",
                &self.host,
                "-p",
                &port,
                "-U",
                &user,
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .await
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!(
                "psql on {}:{port}: {}",
                self.host,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes host `i` a fresh standby of the primary: its data replaced by a base backup.
    pub async fn rebuild_standby(&self, i: usize) -> anyhow::Result<()> {
        let _ = run(
            "pg_ctlcluster",
            &[&self.version, &self.names[i], "stop", "-m", "immediate"],
        )
        .await;
        let dir = self.data_dir(i);
        let _ = std::fs::remove_dir_all(&dir);
        run(
            "install",
            &["-d", "-o", "postgres", "-g", "postgres", "-m", "0700", &dir],
        )
        .await?;
        let primary_port = self.ports[self.primary].to_string();
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &dir,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        )
        .await?;
        run("pg_ctlcluster", &[&self.version, &self.names[i], "start"]).await?;
        Ok(())
    }

    /// The failover: the primary killed, `wait` later the standby promoted (this returns once
    /// it is writable). [`Pair::rebuild_standby`] then makes the old primary the new standby.
    pub async fn fail_over(&mut self, wait: Duration) -> anyhow::Result<()> {
        let old = self.primary;
        let new = 1 - old;
        run(
            "pg_ctlcluster",
            &[&self.version, &self.names[old], "stop", "-m", "immediate"],
        )
        .await?;
        tokio::time::sleep(wait).await;
        run(
            "pg_ctlcluster",
            &[&self.version, &self.names[new], "promote"],
        )
        .await?;
        self.primary = new;
        // Alone until its standby is rebuilt, as an HA manager's non-strict synchronous mode
        // (Patroni's) has it: with no standby to wait for, commits would otherwise wait for the
        // whole rebuild (a base backup of a database that grows over the run: 4-5 s after an
        // hour, which seed 9's last failover counted as the worker's). Nothing is at risk
        // meanwhile: there is no standby to fail over to, and the next failover comes after
        // [`Pair::synchronous_again`].
        self.set_synchronous(new, false).await?;
        Ok(())
    }

    /// Makes the primary synchronous again once its rebuilt standby streams, and checks it is: a
    /// primary left asynchronous would let the next failover lose committed work, and the run's
    /// account would then blame the worker for the harness.
    pub async fn synchronous_again(&self) -> anyhow::Result<()> {
        let primary = self.primary;
        self.set_synchronous(primary, true).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let sync = self
                .sql(
                    primary,
                    "postgres",
                    "SELECT current_setting('synchronous_standby_names') || ' ' || \
                     count(*) FILTER (WHERE sync_state = 'sync') FROM pg_stat_replication",
                )
                .await?;
            if sync.trim() == "* 1" {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the primary has no synchronous standby a minute after its rebuild ({:?})",
                sync.trim()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Turns synchronous replication on host `i` on (any standby) or off, at once.
    async fn set_synchronous(&self, i: usize, on: bool) -> anyhow::Result<()> {
        let names = if on { "*" } else { "" };
        self.sql(
            i,
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"),
        )
        .await?;
        self.sql(i, "postgres", "SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Turns the primary read-only for new transactions (as a demoted primary is), or back.
    pub async fn read_only(&self, on: bool) -> anyhow::Result<()> {
        let value = if on { "on" } else { "off" };
        self.sql(
            self.primary,
            "postgres",
            &format!("ALTER SYSTEM SET default_transaction_read_only = {value}"),
        )
        .await?;
        self.sql(self.primary, "postgres", "SELECT pg_reload_conf()")
            .await?;
        Ok(())
    }

    /// Removes both clusters (a given server is left as it is, the run's database with it).
    pub async fn destroy(&self) {
        if !self.controlled {
            return;
        }
        for name in &self.names {
            let _ = run("pg_dropcluster", &["--stop", &self.version, name]).await;
        }
    }
}

/// Removes the clusters of an earlier run that did not clean up (named with `tag`).
pub async fn destroy_leftovers(tag: &str) {
    let Ok(versions) = std::fs::read_dir("/etc/postgresql") else {
        return;
    };
    for version in versions.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        let Ok(clusters) = std::fs::read_dir(format!("/etc/postgresql/{version}")) else {
            continue;
        };
        for name in clusters.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            if name.starts_with(tag) {
                let _ = run("pg_dropcluster", &["--stop", &version, &name]).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_urls_password_is_decoded_for_psql() {
        assert_eq!(super::decoded("p%40ss%2Fw%3Ard"), "p@ss/w:rd");
        assert_eq!(super::decoded("100%"), "100%");
        assert_eq!(super::decoded("%zz%4"), "%zz%4");
        assert_eq!(super::decoded("caf%C3%A9"), "café");
    }
}
