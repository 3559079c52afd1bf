//! Connection URLs fit for logs and error messages.

/// `raw` with its password, if it has one, replaced by `***`; a string that is not a URL
/// comes back as `<unparsable URL>`, since it may be a password pasted in the wrong place.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_the_password_only() {
        assert_eq!(
            redact_url("amqp://guest:pw@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app@db:5432/shop"),
            "postgres://app@db:5432/shop"
        );
        assert_eq!(redact_url("hunter2"), "<unparsable URL>");
    }
}
