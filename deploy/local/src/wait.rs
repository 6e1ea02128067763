//! Waiting on a condition with a bounded timeout, never a bare sleep.

use std::time::{Duration, Instant};

use crate::Error;

/// Why a probe is not done yet.
#[derive(Debug)]
pub enum Wait {
    /// Not ready; keep polling. The text is reported if the wait times out.
    Retry(String),
    /// Will never become ready (the process died): stop waiting now.
    Fatal(Error),
}

impl From<String> for Wait {
    fn from(s: String) -> Self {
        Wait::Retry(s)
    }
}

impl From<&str> for Wait {
    fn from(s: &str) -> Self {
        Wait::Retry(s.to_owned())
    }
}

impl From<Error> for Wait {
    fn from(e: Error) -> Self {
        Wait::Fatal(e)
    }
}

/// Polls `probe` every 50 ms until it returns `Ok(Some(v))`. Fails at once on
/// [`Wait::Fatal`], or after `timeout` with an [`Error::Timeout`] naming `what`
/// and the last [`Wait::Retry`] reason.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>, Wait>,
) -> Result<T, Error> {
    let start = Instant::now();
    let mut last = None;
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(Wait::Retry(e)) => last = Some(e),
            Err(Wait::Fatal(e)) => return Err(e),
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: timeout,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_until("n reaches 3", Duration::from_secs(5), || {
            n += 1;
            Ok((n >= 3).then_some(n))
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn times_out_with_the_last_error() {
        let e = wait_until::<()>("never", Duration::from_millis(120), || {
            Err(String::from("still no").into())
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("waiting for never"), "{msg}");
        assert!(msg.contains("still no"), "{msg}");
    }

    #[test]
    fn a_fatal_probe_stops_the_wait_at_once() {
        let start = std::time::Instant::now();
        let e = wait_until::<()>("doomed", Duration::from_secs(30), || {
            Err(Error::Missing("thing".into()).into())
        })
        .unwrap_err();
        assert!(matches!(e, Error::Missing(_)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
