//! Value parsers for numeric flags. clap names the flag in its message ("invalid value
//! '-1' for '--top-k <TOP_K>': ...") and exits with status 2; these add what the value
//! should have been. Generation flags reuse the search's own checks, so the command line
//! and the library agree on every range.

use blip2_runtime::generation as g;

fn whole(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| format!("expected a whole number of 0 or more, got {s:?}"))
}

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("expected a number, got {s:?}"))?;
    if v.is_nan() {
        return Err("expected a number, got NaN".into());
    }
    Ok(v)
}

/// A count that may be 0.
pub fn count(s: &str) -> Result<usize, String> {
    whole(s)
}

/// A count of at least 1.
pub fn positive(s: &str) -> Result<usize, String> {
    match whole(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A thread count: at least 1, at most 4 per core of this machine.
pub fn threads(s: &str) -> Result<usize, String> {
    let n = whole(s)?;
    blip2_runtime::config::check_threads(n)?;
    Ok(n)
}

/// A seed: any whole number from 0 to 2^64 - 1.
pub fn seed(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("expected a whole number from 0 to {}, got {s:?}", u64::MAX))
}

fn checked<T>(v: T, check: impl FnOnce(T) -> Result<(), g::ConfigError>) -> Result<T, String>
where
    T: Copy,
{
    check(v).map(|()| v).map_err(|e| e.message.to_string())
}

pub fn max_new_tokens(s: &str) -> Result<usize, String> {
    checked(whole(s)?, g::check_max_new_tokens)
}

pub fn num_beams(s: &str) -> Result<usize, String> {
    checked(whole(s)?, g::check_num_beams)
}

pub fn num_return_sequences(s: &str) -> Result<usize, String> {
    checked(whole(s)?, g::check_num_return_sequences)
}

pub fn length_penalty(s: &str) -> Result<f64, String> {
    checked(number(s)?, g::check_length_penalty)
}

pub fn repetition_penalty(s: &str) -> Result<f64, String> {
    checked(number(s)?, g::check_repetition_penalty)
}

pub fn temperature(s: &str) -> Result<f64, String> {
    checked(number(s)?, g::check_temperature)
}

pub fn top_p(s: &str) -> Result<f64, String> {
    checked(number(s)?, g::check_top_p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_the_search_checks() {
        assert_eq!(count("0"), Ok(0));
        assert!(count("-1").unwrap_err().contains("0 or more"));
        assert!(positive("0").unwrap_err().contains("at least 1"));
        assert!(top_p("1.5").unwrap_err().contains("(0, 1]"));
        assert_eq!(top_p("0.9"), Ok(0.9));
        assert!(temperature("-1").unwrap_err().contains("strictly positive"));
        assert!(temperature("nan").is_err());
        assert_eq!(length_penalty("-0.5"), Ok(-0.5));
        assert!(seed("-3").is_err());
    }
}
