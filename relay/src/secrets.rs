//! Secrets the settings point at: read from files (mounted Kubernetes or Docker secrets),
//! put into a server URL's password, and kept out of the URLs shown in logs and messages.
//! The database and the brokers share these.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

/// Reads a secret from a file (a mounted Kubernetes or Docker secret), without its trailing
/// newline. The error names the setting and the file, never the content.
pub fn read_secret_file(setting: &str, path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(format!("{setting}: {} is empty", path.display()));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// Puts the content of `<section>.password_file` into the URL's password.
pub(crate) fn with_password_file(
    url: &SecretString,
    section: &str,
    file: Option<&Path>,
) -> Result<SecretString, String> {
    let Some(file) = file else {
        return Ok(url.clone());
    };
    let setting = format!("{section}.password_file");
    let password = read_secret_file(&setting, file)?;
    let mut parsed = url::Url::parse(url.expose_secret())
        .map_err(|e| format!("{section}.url is not a valid URL ({e})"))?;
    if parsed.username().is_empty() {
        return Err(format!(
            "{setting} is set but {section}.url names no user to go with it"
        ));
    }
    parsed
        .set_password(Some(password.expose_secret()))
        .map_err(|()| format!("{section}.url cannot carry a password"))?;
    Ok(SecretString::from(parsed.to_string()))
}

/// A URL with its password hidden, for logs (defined once, in the `outbox` crate).
pub use outbox::redact_url;
