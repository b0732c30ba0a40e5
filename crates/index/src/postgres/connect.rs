//! Connecting: URLs and their redaction, TLS (rustls, libpq's sslmode/sslrootcert), ~/.pgpass, and errors that name the server.

use super::*;

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth {
        Some(a) => {
            let user = a.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

pub(super) fn pg_err(shown: &str, e: postgres::Error) -> Error {
    let reason = match e.as_db_error() {
        Some(db) => {
            let mut r = db.message().to_string();
            if let Some(d) = db.detail() {
                r.push_str(&format!(" ({d})"));
            }
            if db.code() == &postgres::error::SqlState::INVALID_PASSWORD
                || db.code() == &postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                r.push_str(
                    "; the password comes from the URL (postgres://USER:PASSWORD@...), \
                     PGPASSWORD or ~/.pgpass",
                );
            }
            r
        }
        None => {
            let mut r = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                r.push_str(&format!(": {s}"));
                src = s.source();
            }
            if e.is_closed() || r.contains("onnection refused") {
                r.push_str(" (is the server running?)");
            } else if r.contains("onnection reset")
                || r.contains("roken pipe")
                || r.contains("unexpected EOF")
            {
                // A server that stops mid-query may close the socket before
                // its "terminating connection" notice is read.
                r.push_str(" (the server dropped the connection: is the server running?)");
            } else if r.contains("certificate") || r.contains("UnknownIssuer") {
                r.push_str(
                    " (the server's TLS certificate is not trusted: give its CA as \
                     sslrootcert=PATH.pem in the URL, or PGSSLROOTCERT)",
                );
            } else if r.contains("does not support TLS") {
                r.push_str(" (sslmode=require asks for TLS, which this server does not offer)");
            }
            r
        }
    };
    Error::Report(format!("{shown}: {reason}"))
}

/// The password for `cfg` from ~/.pgpass (host:port:database:user:password,
/// `*` matching anything), as libpq reads it.
pub(super) fn pgpass_password(cfg: &Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match cfg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = cfg.get_dbname().unwrap_or("").to_string();
    let user = cfg.get_user().unwrap_or("").to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.splitn(5, ':').collect();
        if f.len() == 5
            && [&host, &port, &db, &user]
                .iter()
                .zip(&f)
                .all(|(want, got)| *got == "*" || got == want)
        {
            return Some(f[4].to_string());
        }
    }
    None
}

/// A parsed connection target: tokio-postgres's config, and the TLS
/// connector for it (the server's certificate is checked against
/// `sslrootcert` when given, else Mozilla's roots).
#[derive(Clone)]
pub(super) struct Target {
    pub(super) cfg: Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

/// Takes out of `url` what tokio-postgres does not parse itself: libpq's
/// `sslrootcert` (or `PGSSLROOTCERT`), and `sslmode=verify-ca|verify-full`,
/// which become `require` (rustls always verifies the certificate and the
/// host name, so `require` here is libpq's `verify-full`). Handles the URL
/// form (`postgres://...?a=b&c=d`) and the key=value form.
pub(super) fn split_tls_params(url: &str) -> (String, Option<String>) {
    let mut root = None;
    let mut keep = |k: &str, v: &str| -> Option<String> {
        match (k, v) {
            ("sslrootcert", v) => {
                root = Some(v.to_string());
                None
            }
            ("sslmode", "verify-ca" | "verify-full") => Some(format!("{k}=require")),
            _ => Some(format!("{k}={v}")),
        }
    };
    let out = if url.contains("://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                        if k == "sslrootcert" || k == "sslmode" {
                            keep(k, &v)
                        } else {
                            Some(p.to_string())
                        }
                    })
                    .collect();
                if params.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", params.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter_map(|p| match p.split_once('=') {
                Some((k @ ("sslrootcert" | "sslmode"), v)) => keep(k, v),
                _ => Some(p.to_string()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let root = root.or_else(|| std::env::var("PGSSLROOTCERT").ok());
    (out, root.filter(|r| !r.is_empty()))
}

/// The TLS connector: the certificates in `root_cert` (a PEM file) as the
/// only trusted roots when given (libpq's `sslrootcert`), else Mozilla's.
pub(super) fn tls(
    root_cert: Option<&str>,
    shown: &str,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let bad = |why: String| Error::Report(format!("{shown}: sslrootcert {path}: {why}"));
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificates in the file".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("rustls's default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Parses `url` into a connection target with the password, timeouts,
/// keepalives and TLS roots set.
pub(super) fn config(url: &str, timeout: Duration) -> Result<Target> {
    let shown = redact(url);
    let (url, root_cert) = split_tls_params(url);
    let mut cfg: Config = url
        .parse()
        .map_err(|e| Error::Report(format!("{shown}: not a PostgreSQL URL: {e}")))?;
    if cfg.get_password().is_none() {
        if let Some(p) = std::env::var("PGPASSWORD")
            .ok()
            .or_else(|| pgpass_password(&cfg))
        {
            cfg.password(p);
        }
    }
    cfg.connect_timeout(timeout);
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(10));
    cfg.options(&format!("-c statement_timeout={}", timeout.as_millis()));
    cfg.application_name("clasp");
    let tls = tls(root_cert.as_deref(), &shown)?;
    Ok(Target { cfg, tls })
}

pub(super) fn connect_config(t: &Target, shown: &str) -> Result<Client> {
    t.cfg.connect(t.tls.clone()).map_err(|e| pg_err(shown, e))
}

/// An error of shard `server` (foreign server name) at `shown` (its
/// redacted URL), naming both.
pub(super) fn shard_err(server: &str, shown: &str, e: postgres::Error) -> Error {
    Error::Report(format!("shard {server} ({shown}): {}", pg_err(shown, e)))
}
