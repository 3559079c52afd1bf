//! Checks the settings sections share (the database's, the relay's, each broker's): each
//! adds a problem that names its setting, and never repeats a secret.

use std::{path::Path, time::Duration};

use crate::route::Template;

/// Checks that a configured file can be read, naming the setting and the file.
pub(crate) fn readable(p: &mut Vec<String>, name: &str, path: Option<&Path>) {
    if let Some(path) = path {
        if let Err(e) = std::fs::File::open(path) {
            p.push(format!("{name}: cannot read {}: {e}", path.display()));
        }
    }
}

pub(crate) fn positive(p: &mut Vec<String>, name: &str, d: Duration) {
    if d.is_zero() {
        p.push(format!("{name} must be longer than zero"));
    }
}

/// Checks a server URL's shape; the message never repeats the URL (it may hold a password).
pub(crate) fn check_url(raw: &str, schemes: &[&str]) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "has scheme {:?}; expected {}",
            url.scheme(),
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// Checks that each named value is a valid route template (`{topic}`, `{key}`).
pub(crate) fn templates<'a>(
    p: &mut Vec<String>,
    templates: impl IntoIterator<Item = (String, &'a String)>,
) {
    for (name, value) in templates {
        if let Err(e) = Template::parse(value) {
            p.push(format!("{name}: {e}"));
        }
    }
}
