//! API errors and the one place where they become HTTP statuses.
//!
//! Every failure a client can cause or meet has its own variant, a stable machine-readable `code`
//! and a message that says what to change. The body is always
//! `{"error": {"code": "...", "message": "..."}}`.

use http::StatusCode;

use std::time::Duration;

use crate::embed::EmbedError;
use crate::preprocess::PreprocessError;
use crate::profiles::ProfileError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route for the path.
    #[error("no route for {0}")]
    NotFound(String),
    /// The path exists but not with this method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The body is larger than the configured limit.
    #[error("the request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    /// The body could not be read from the connection.
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    /// The Content-Type is not one this route takes.
    #[error("Content-Type {got:?} is not supported here; send {want}")]
    UnsupportedMediaType {
        /// What the client sent.
        got: String,
        /// What the route takes.
        want: &'static str,
    },
    /// A header value is malformed.
    #[error("header {name}: {message}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A query parameter is missing or malformed.
    #[error("query parameter {name}: {message}")]
    BadQuery {
        /// The parameter.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The body is not valid JSON.
    #[error("invalid JSON: {0}")]
    BadJson(String),
    /// A base64 field does not decode.
    #[error("{field}: invalid base64: {message}")]
    BadBase64 {
        /// Where the field is, e.g. `references[2].image_b64`.
        field: String,
        /// The decoder's message.
        message: String,
    },
    /// An error about one reference of a profile upload.
    #[error("references[{0}]: {1}")]
    InReference(usize, Box<ApiError>),
    /// The JSON is well-formed but its content is invalid.
    #[error("{0}")]
    Unprocessable(String),
    /// A profile operation failed.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The profile was built by another model and must be uploaded again.
    #[error("profile {0:?} was built with another model; upload its references again")]
    StaleProfile(String),
    /// Missing or wrong admin bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// A tuning push older than the one in force.
    #[error(transparent)]
    StaleTuning(#[from] crate::embed::batcher::StaleTuning),
    /// The request pipeline could not produce an embedding.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// An image too small to hash.
    #[error("the image is {width}x{height}; PDQ needs at least {min}x{min} pixels", min = crate::pdq::MIN_SIDE)]
    ImageTooSmall {
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
    },
    /// The model is not loaded yet.
    #[error("the model is still loading; retry when /readyz answers 200")]
    NotReady,
    /// Something that should not fail did.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and stable error code.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::NotFound(_) => (S::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::BodyTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::BodyRead(_) => (S::BAD_REQUEST, "body_read_failed"),
            ApiError::UnsupportedMediaType { .. } => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::BadHeader { .. } => (S::BAD_REQUEST, "invalid_header"),
            ApiError::BadQuery { .. } => (S::BAD_REQUEST, "invalid_query"),
            ApiError::BadJson(_) => (S::BAD_REQUEST, "invalid_json"),
            ApiError::BadBase64 { .. } => (S::BAD_REQUEST, "invalid_base64"),
            ApiError::InReference(_, inner) => inner.status_code(),
            ApiError::Unprocessable(_) => (S::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::Profile(e) => match e {
                ProfileError::NotFound(_) => (S::NOT_FOUND, "profile_not_found"),
                ProfileError::InvalidId(_) => (S::BAD_REQUEST, "invalid_profile_id"),
                ProfileError::DimensionMismatch { .. } => (S::UNPROCESSABLE_ENTITY, "dimension_mismatch"),
                ProfileError::Io(..) => (S::INTERNAL_SERVER_ERROR, "storage_error"),
                _ => (S::UNPROCESSABLE_ENTITY, "invalid_profile"),
            },
            ApiError::StaleProfile(_) => (S::CONFLICT, "stale_profile"),
            ApiError::Unauthorized => (S::UNAUTHORIZED, "unauthorized"),
            ApiError::StaleTuning(_) => (S::CONFLICT, "stale_generation"),
            ApiError::Embed(e) => embed_status(e),
            ApiError::ImageTooSmall { .. } => (S::UNPROCESSABLE_ENTITY, "image_too_small"),
            ApiError::NotReady => (S::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// When a refused client should try again (the `Retry-After` of 429 and 503 answers).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Embed(e) => e.retry_after(),
            ApiError::InReference(_, inner) => inner.retry_after(),
            ApiError::NotReady => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Status and code of a pipeline error.
fn embed_status(e: &EmbedError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        EmbedError::Empty => (S::BAD_REQUEST, "empty_body"),
        EmbedError::Image(e) => match e {
            PreprocessError::Empty => (S::BAD_REQUEST, "empty_body"),
            PreprocessError::UnknownFormat => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_image"),
            PreprocessError::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "image_too_large"),
            PreprocessError::Corrupt(_) => (S::UNPROCESSABLE_ENTITY, "corrupt_image"),
        },
        EmbedError::QueueFull { .. } => (S::TOO_MANY_REQUESTS, "queue_full"),
        EmbedError::Overloaded(_) => (S::TOO_MANY_REQUESTS, "overloaded"),
        EmbedError::DeadlineExceeded => (S::GATEWAY_TIMEOUT, "deadline_exceeded"),
        EmbedError::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down"),
        EmbedError::Inference(_) => (S::INTERNAL_SERVER_ERROR, "inference_failed"),
        EmbedError::Shared(inner) => embed_status(inner),
    }
}
