//! Image URLs of a request: `data:` URLs always; `file://` only under
//! `--allowed-local-media-path`; `http(s)://` only with `--allow-remote-media`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

/// Where images may come from.
#[derive(Clone, Debug, Default)]
pub struct MediaPolicy {
    /// `file://` URLs must name a file under this folder (after resolving links).
    pub local_root: Option<PathBuf>,
    /// Fetch `http://` and `https://` URLs.
    pub remote: bool,
    /// The most bytes an image may have.
    pub max_bytes: usize,
}

/// Why an image URL was refused: the message names the problem, for a 400 answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MediaError(pub String);

fn err(m: impl Into<String>) -> MediaError {
    MediaError(m.into())
}

/// The image bytes an URL names, and a short name for messages.
pub fn fetch(url: &str, policy: &MediaPolicy) -> Result<(Vec<u8>, String), MediaError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return data_url(rest, policy).map(|b| (b, "the data: URL".to_string()));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return local_file(path, policy).map(|b| (b, path.to_string()));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        if !policy.remote {
            return Err(err(
                "http(s) image URLs are not fetched by this server (start it with --allow-remote-media); \
                 send the image as a data:image/...;base64, URL",
            ));
        }
        return remote(url, policy).map(|b| (b, url.to_string()));
    }
    let shown: String = url.chars().take(40).collect();
    Err(err(format!(
        "image_url must be a data:image/...;base64, URL, a file:// URL or an http(s) URL, not {shown:?}"
    )))
}

fn data_url(rest: &str, policy: &MediaPolicy) -> Result<Vec<u8>, MediaError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(err("malformed data: URL: no ',' before the data"));
    };
    let mut parts = meta.split(';');
    let media_type = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(err("the data: URL is not base64-encoded (data:image/...;base64,...)"));
    }
    if !media_type.is_empty()
        && !media_type.starts_with("image/")
        && media_type != "application/octet-stream"
    {
        return Err(err(format!("the data: URL holds {media_type:?}, not an image")));
    }
    // Each 4 base64 characters make 3 bytes: refuse oversized payloads before decoding.
    if payload.len() / 4 * 3 > policy.max_bytes {
        return Err(err(format!(
            "the image is over the server's limit of {} bytes",
            policy.max_bytes
        )));
    }
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| err(format!("the data: URL is not valid base64: {e}")))
}

fn local_file(path: &str, policy: &MediaPolicy) -> Result<Vec<u8>, MediaError> {
    let Some(root) = &policy.local_root else {
        return Err(err("file:// image URLs are off; start the server with --allowed-local-media-path DIR to allow files under DIR"));
    };
    let requested = Path::new(path);
    let resolved =
        requested.canonicalize().map_err(|e| err(format!("{path}: cannot open the image: {e}")))?;
    if !resolved.starts_with(root) {
        return Err(err(format!("{path}: outside the folder this server may read images from")));
    }
    let meta = std::fs::metadata(&resolved).map_err(|e| err(format!("{path}: {e}")))?;
    if !meta.is_file() {
        return Err(err(format!("{path}: not a file")));
    }
    if meta.len() > policy.max_bytes as u64 {
        return Err(err(format!(
            "{path}: {} bytes, over the server's limit of {}",
            meta.len(),
            policy.max_bytes
        )));
    }
    std::fs::read(&resolved).map_err(|e| err(format!("{path}: {e}")))
}

fn remote(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>, MediaError> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).redirects(5).build();
    let resp =
        agent.get(url).call().map_err(|e| err(format!("{url}: cannot fetch the image: {e}")))?;
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(policy.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("{url}: reading the image: {e}")))?;
    if bytes.len() > policy.max_bytes {
        return Err(err(format!(
            "{url}: the image is over the server's limit of {} bytes",
            policy.max_bytes
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> MediaPolicy {
        MediaPolicy { local_root: None, remote: false, max_bytes: 1 << 20 }
    }

    #[test]
    fn data_urls_decode_and_name_what_is_wrong() {
        let (b, _) = fetch("data:image/png;base64,aGVsbG8=", &policy()).unwrap();
        assert_eq!(b, b"hello");
        for (url, says) in [
            ("data:image/png;base64,@@@", "not valid base64"),
            ("data:text/plain;base64,aGVsbG8=", "not an image"),
            ("data:image/png,hello", "not base64-encoded"),
            ("data:image/png;base64", "no ','"),
            ("file:///etc/passwd", "--allowed-local-media-path"),
            ("https://example.com/a.png", "--allow-remote-media"),
            ("ftp://x", "must be a data:"),
        ] {
            let e = fetch(url, &policy()).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn local_files_only_under_the_allowed_folder() {
        let dir = std::env::temp_dir().join(format!("blip2-serve-media-{}", std::process::id()));
        let inside = dir.join("in");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("a.bin"), b"abc").unwrap();
        std::fs::write(dir.join("secret.bin"), b"no").unwrap();
        let p = MediaPolicy { local_root: Some(inside.canonicalize().unwrap()), ..policy() };
        let ok = format!("file://{}", inside.join("a.bin").display());
        assert_eq!(fetch(&ok, &p).unwrap().0, b"abc");
        // A path that climbs out of the folder is refused, as is one outside it.
        let climb = format!("file://{}/../secret.bin", inside.display());
        assert!(fetch(&climb, &p).unwrap_err().to_string().contains("outside"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
