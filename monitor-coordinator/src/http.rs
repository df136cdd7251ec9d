//! What every HTTP server here puts in front of its routes: a header size limit and a bearer
//! token, shared by the daemon's pull API and the coordinator.
use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;

/// Bytes of request headers (names and values) a server takes; more is refused (431).
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// Middleware refusing requests whose headers exceed `MAX_HEADER_BYTES`.
pub async fn limit_headers(request: Request, next: Next) -> Response {
    let size: usize = request.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    if size > MAX_HEADER_BYTES {
        let msg = format!("request headers are {size} bytes; at most {MAX_HEADER_BYTES}\n");
        return (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, msg).into_response();
    }
    next.run(request).await
}

/// The bearer token a server requires (`None`: open); state of `require_token`.
#[derive(Clone)]
pub struct RequiredToken(pub Option<Arc<str>>);

/// Middleware refusing requests without the token, compared in constant time.
pub async fn require_token(
    State(token): State<RequiredToken>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &token.0 {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "token required\n")
                .into_response();
        }
    }
    next.run(request).await
}

/// The token in a token file: its one line, without surrounding white space.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?;
    let token = token.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the token file must hold one non-empty line",
        ));
    }
    Ok(token.to_string())
}
