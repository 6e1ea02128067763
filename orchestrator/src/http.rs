//! `http`: a minimal HTTP/1.1 client for agent-to-agent and CLI calls.
//!
//! One request per connection over hyper's low-level client: the agent asks a
//! handful of peers for `/status` during failover and the CLI makes single
//! calls, so pooling would buy nothing. Every call has a deadline.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad url {0:?}: expected http://host:port")]
    Url(String),
    #[error("{url}: {detail}")]
    Failed { url: String, detail: String },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// A response: status code and body text.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `method` to `base` + `path` with an optional JSON body and basic auth.
pub async fn call(
    method: &str,
    base: &str,
    path: &str,
    body: Option<String>,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    match tokio::time::timeout(timeout, send(method, base, path, body, auth)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(detail)) => Err(HttpError::Failed { url, detail }),
        Err(_) => Err(HttpError::Timeout { url, timeout }),
    }
}

async fn send(
    method: &str,
    base: &str,
    path: &str,
    body: Option<String>,
    auth: Option<(&str, &str)>,
) -> Result<Response, String> {
    let hostport = base
        .strip_prefix("http://")
        .map(|s| s.trim_end_matches('/'))
        .ok_or_else(|| HttpError::Url(base.to_owned()).to_string())?;
    let stream = TcpStream::connect(hostport)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", hostport)
        .header("content-type", "application/json");
    if let Some((u, p)) = auth {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header("authorization", format!("Basic {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
