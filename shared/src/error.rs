//! What the error types of the crate have in common: a boxed cause, kept whole so callers
//! and logs can walk `source()`, and a context wrapper whose message names what was being
//! done and shows the whole cause chain (some causes, such as the AWS SDK's `SdkError`, say
//! only "service error" on their own and keep the useful part further down the chain).

use std::error::Error;
use std::fmt;

/// Any error, kept as the cause of one of ours.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// A cause with a note of what was being done when it happened, e.g. `GetItem` or
/// `decoding WorkspaceState`.
#[derive(Debug)]
pub struct Context {
    what: String,
    source: BoxError,
}

impl Context {
    pub fn new(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            what: what.into(),
            source: source.into(),
        }
    }

    /// What was being done.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, Chain(self.source.as_ref()))
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Shows an error and its causes as `outer: inner: innermost`, leaving out a cause whose
/// message the previous one already ends with (SDK errors often repeat their source).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !text.is_empty() && !shown.ends_with(&text) {
                write!(f, ": {text}")?;
                shown = text;
            }
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("service error")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn context_names_the_step_and_shows_the_causes_below_an_uninformative_error() {
        let e = Context::new("GetItem", Outer(std::io::Error::other("connection reset")));
        assert_eq!(e.to_string(), "GetItem: service error: connection reset");
        assert_eq!(e.what(), "GetItem");
        let cause = e.source().expect("the cause is kept");
        assert!(cause.downcast_ref::<Outer>().is_some());
    }
}
