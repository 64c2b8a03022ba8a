//! The one place errors become HTTP: a status and
//! `{"error": {"code", "message", "field"}}`, also for malformed JSON,
//! wrong content types and oversized bodies. A 500 never shows internals.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::policies::PolicyError;
use crate::restic::ResticError;
use crate::store::StoreError;

/// Every error the API sends, whatever the status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case; also the metric label.
    #[schema(example = "invalid_field")]
    pub code: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The field at fault, when it is one field, e.g. `schedule.cron`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code.into(), message: message.into(), field: None }
    }
    pub fn field(status: StatusCode, code: &str, field: &str, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code.into(), message: message.into(), field: Some(field.into()) }
    }
    pub fn internal(message: &str) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn from_bytes_rejection(e: BytesRejection) -> ApiError {
        if super::slow::is_body_timeout(&e) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time; send it at once after the headers",
            )
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than {} bytes", super::MAX_BODY_BYTES),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", "the request body could not be read")
        }
    }

    pub fn from_restic(e: &ResticError) -> ApiError {
        let status = match e {
            ResticError::NotInstalled { .. }
            | ResticError::RepositoryUnreachable { .. }
            | ResticError::RepositoryLocked { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ResticError::WrongPassword { .. }
            | ResticError::AccessDenied { .. }
            | ResticError::RepositoryNotFound { .. }
            | ResticError::Credentials(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ResticError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.kind(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message, field: self.field } };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match &e {
            StoreError::NameTaken(_) => ApiError::field(StatusCode::CONFLICT, e.kind(), "name", e.to_string()),
            StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", "not found"),
            StoreError::DiskFull => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.kind(), e.to_string()),
            _ => {
                tracing::error!(error = %e, "state database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.kind(),
                    "the agent's state database failed; the agent's log has the details",
                )
            }
        }
    }
}

impl From<crate::scheduler::RunRequestError> for ApiError {
    fn from(e: crate::scheduler::RunRequestError) -> ApiError {
        use crate::scheduler::RunRequestError as E;
        match e {
            E::Busy { policy, run, state } => ApiError::new(
                StatusCode::CONFLICT,
                "run_in_progress",
                format!("policy {policy} already has run {run} {state}; wait for it (GET /v1/runs/{run}) or cancel it (POST /v1/runs/{run}/cancel)"),
            ),
            E::Invalid(f) => ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", &f.field, f.message),
            E::TargetNotEmpty(m) => ApiError::field(StatusCode::CONFLICT, "target_not_empty", "target", m),
            e @ E::Stopping => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "agent_stopping", e.to_string()),
            E::Store(s) => s.into(),
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> ApiError {
        match e {
            PolicyError::Invalid(f) => {
                ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", &f.field, f.message)
            }
            PolicyError::Store(s) => s.into(),
            PolicyError::Body(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", m),
            PolicyError::ManagedByKubernetes(m) => ApiError::new(StatusCode::CONFLICT, "managed_by_kubernetes", m),
        }
    }
}

pub fn require_json(ct: &HeaderValue) -> Result<(), ApiError> {
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime == "application/json"
        || mime == "application/merge-patch+json"
        || (mime.starts_with("application/") && mime.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the body must be JSON: send Content-Type: application/json (got {mime:?})"),
        ))
    }
}

/// Parse a JSON body, telling a syntax error (400) from a body of the
/// wrong shape (422, with the path of the field at fault).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof
            | serde_json::error::Category::Io => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON: {inner}"))
            }
            serde_json::error::Category::Data => {
                let msg = inner.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                let field = if path == "." { None } else { Some(path.clone()) };
                let mut err = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    if path == "." { msg } else { format!("{path}: {msg}") },
                );
                err.field = field;
                err
            }
        }
    })
}

/// A JSON body that must say it is JSON (415 otherwise), at most
/// `MAX_BODY_BYTES` (413), parse (400) and fit `T` (422).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match req.headers().get(axum::http::header::CONTENT_TYPE) {
            Some(ct) => require_json(ct)?,
            None => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON: send Content-Type: application/json",
                ))
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(ApiError::from_bytes_rejection)?;
        parse_json(&bytes).map(ApiJson)
    }
}
