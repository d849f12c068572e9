//! Serving one representation: conditionals, ranges, headers and the body.
//!
//! Every byte-serving route ends here, so the RFC 9110 behaviour (206, 416,
//! multipart/byteranges, 304, HEAD) is the same for manifests, objects, chunk
//! lists and versions. The decision is made from the representation's metadata
//! alone, before any bytes are opened: a 304, a 416 or a HEAD never touches the
//! store (and never triggers an upstream fetch).

use std::collections::VecDeque;
use std::time::SystemTime;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};

use super::body::{Piece, PieceStream};
use super::conditional::{self, Precondition};
use super::error::ApiError;
use super::range::{self, ByteRange, RangeOutcome};
use crate::digest::Digest;
use crate::limits::Permit;
use crate::source::Content;
use crate::store::{Blob, Mapped};

/// The metadata of what a URL names, known before opening any bytes.
pub struct Representation {
    pub etag: Digest,
    /// The `ETag` and `Last-Modified` values, preformatted where possible.
    pub etag_value: HeaderValue,
    pub modified_value: HeaderValue,
    pub len: u64,
    pub modified: SystemTime,
    pub cache_control: HeaderValue,
    pub content_type: HeaderValue,
    /// `X-Patchrelay-Version`, for component routes.
    pub version: Option<String>,
    /// Served ahead of bulk traffic when `limits.total_rate` binds.
    pub critical: bool,
    /// Whether these bytes can never change at this URL. Only then is a date a
    /// strong enough validator for `If-Range` (a manifest can be replaced
    /// within the second its `Last-Modified` names).
    pub immutable: bool,
}

/// What to answer, decided from the request headers and the metadata.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    NotModified,
    Full,
    Partial(Vec<ByteRange>),
}

/// Decide, or fail with the 412/416 to send.
pub fn decide(req: &HttpRequest, rep: &Representation) -> Result<Decision, ApiError> {
    let headers = req.headers();
    let method = req.method();
    let safe = method == Method::GET || method == Method::HEAD;
    match conditional::evaluate(headers, &rep.etag, rep.modified, safe) {
        Precondition::Proceed => {}
        Precondition::NotModified => return Ok(Decision::NotModified),
        Precondition::Failed => return Err(ApiError::PreconditionFailed),
    }
    let Some(range) = headers.get(header::RANGE) else {
        return Ok(Decision::Full);
    };
    // RFC 9110 §14.2: range handling is defined for GET only (HEAD answers as
    // an unranged GET would).
    if method != Method::GET || !conditional::if_range_allows(headers, &rep.etag, rep.modified, rep.immutable) {
        return Ok(Decision::Full);
    }
    match range::resolve(range.as_bytes(), rep.len) {
        RangeOutcome::Full => Ok(Decision::Full),
        RangeOutcome::Partial(ranges) => Ok(Decision::Partial(ranges)),
        RangeOutcome::Unsatisfiable => Err(ApiError::RangeNotSatisfiable(rep.len)),
    }
}

/// Whether answering needs the bytes (GET with a 200 or 206).
pub fn needs_body(req: &HttpRequest, decision: &Decision) -> bool {
    req.method() == Method::GET && *decision != Decision::NotModified
}

fn common_headers(res: &mut HttpResponseBuilder, rep: &Representation) {
    res.insert_header((header::ETAG, rep.etag_value.clone()));
    res.insert_header((header::LAST_MODIFIED, rep.modified_value.clone()));
    res.insert_header((header::CACHE_CONTROL, rep.cache_control.clone()));
    res.insert_header((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
    if let Some(v) = &rep.version
        && let Ok(v) = HeaderValue::from_str(v)
    {
        res.insert_header(("x-patchrelay-version", v));
    }
}

/// The pieces that send range `r` of `content`. `copies`: the connection
/// reads body bytes in user space (TLS encrypts them), so a mapping is not
/// handed to it: a page of a file cut short under the mapping would raise
/// SIGBUS there (see `store::Mapped`). Its file is read instead.
fn slice(content: &Content, r: ByteRange, copies: bool, pieces: &mut VecDeque<Piece>) {
    let piece = match content {
        Content::Stored(Blob::Memory(b)) => Piece::Bytes(b.slice(r.start as usize..=r.end as usize)),
        Content::Stored(Blob::Mapped(m)) if copies => {
            Piece::SharedFile { file: m.file.clone(), offset: r.start, len: r.len() }
        }
        Content::Stored(Blob::Mapped(m)) => {
            // The object's last bytes come from its file, not the mapping
            // (see `store::Mapped`): a file cut short then ends the response
            // short instead of sending zeros as if they were its bytes.
            let tail = (m.bytes.len() as u64).saturating_sub(Mapped::TAIL);
            if r.start < tail {
                let end = r.end.min(tail - 1);
                pieces.push_back(Piece::Bytes(m.bytes.slice(r.start as usize..=end as usize)));
                if r.end < tail {
                    return;
                }
            }
            let from = r.start.max(tail);
            Piece::SharedFile { file: m.file.clone(), offset: from, len: r.end + 1 - from }
        }
        Content::Stored(Blob::File { file, .. }) => Piece::File { file: file.clone(), offset: r.start, len: r.len() },
        Content::Filling(handle) => Piece::Growing { handle: Box::new(handle.clone()), offset: r.start, len: r.len() },
    };
    pieces.push_back(piece);
}

/// The largest body sent whole in one go, from memory, without a stream (and,
/// under limits, reserved and finished at admission when it may go at once).
/// Only small bodies: actix copies such a body into the connection's buffer
/// in one go, and a mapped 24 MiB object must go out in paced pieces.
pub const AT_ONCE_MAX: u64 = 64 * 1024;

/// Whether the body is a whole small object in memory, sent in one go (see
/// [`AT_ONCE_MAX`]).
pub fn goes_whole(rep: &Representation, decision: &Decision, blob: Option<&Content>) -> bool {
    rep.len <= AT_ONCE_MAX && *decision == Decision::Full && matches!(blob, Some(Content::Stored(Blob::Memory(_))))
}

/// Per-server settings the responses need.
pub struct ResponseCtx<'a> {
    /// The multipart boundary (random per process).
    pub boundary: &'a str,
    /// Where to count body bytes sent.
    pub sent_counter: &'static crate::telemetry::Tally,
    /// The agent's download slot and rate, when a limit policy applies.
    pub permit: Option<Permit>,
    /// The largest body piece (see `body::piece_cap`).
    pub max_piece: usize,
    /// What to tell when a response from a stored object ends early
    /// (`body::PieceStream::on_short`).
    pub on_short: Option<super::body::OnShort>,
    /// The connection copies body bytes in user space (TLS): see `slice`.
    pub copies: bool,
}

/// The body being assembled: its exact length always, its pieces only when
/// there is a blob to read them from (GET; HEAD sends headers only).
struct Assembly<'b> {
    blob: Option<&'b Content>,
    copies: bool,
    pieces: VecDeque<Piece>,
    len: u64,
}

impl Assembly<'_> {
    fn text(&mut self, s: String) {
        self.len += s.len() as u64;
        if self.blob.is_some() {
            self.pieces.push_back(Piece::Bytes(s.into()));
        }
    }

    fn data(&mut self, r: ByteRange) {
        self.len += r.len();
        if let Some(b) = self.blob {
            slice(b, r, self.copies, &mut self.pieces);
        }
    }
}

/// Build the response. `blob` must be `Some` when [`needs_body`] said so.
pub fn build(
    rep: &Representation,
    decision: Decision,
    blob: Option<&Content>,
    mut ctx: ResponseCtx<'_>,
) -> HttpResponse {
    // The common case, a whole small object from memory that needs no pacing:
    // hand actix the bytes themselves (no stream, no boxing). Under a limit,
    // admission has usually reserved the bytes already; if they are due at
    // once, the download is over as far as its agent's slot is concerned.
    if let Some(Content::Stored(Blob::Memory(bytes))) = blob
        && goes_whole(rep, &decision, blob)
        && ctx.permit.as_mut().is_none_or(|p| p.send_at_once(rep.len))
    {
        let mut res = HttpResponse::Ok();
        common_headers(&mut res, rep);
        res.insert_header((header::CONTENT_TYPE, rep.content_type.clone()));
        ctx.sent_counter.add(bytes.len() as u64);
        return res.body(bytes.clone());
    }
    let mut body = Assembly { blob, copies: ctx.copies, pieces: VecDeque::new(), len: 0 };
    let mut res = match &decision {
        Decision::NotModified => {
            let mut res = HttpResponse::NotModified();
            common_headers(&mut res, rep);
            return res.finish();
        }
        Decision::Full => {
            let mut res = HttpResponse::Ok();
            res.insert_header((header::CONTENT_TYPE, rep.content_type.clone()));
            if rep.len > 0 {
                body.data(ByteRange { start: 0, end: rep.len - 1 });
            }
            res
        }
        Decision::Partial(ranges) if ranges.len() == 1 => {
            let r = ranges[0];
            let mut res = HttpResponse::build(StatusCode::PARTIAL_CONTENT);
            res.insert_header((header::CONTENT_TYPE, rep.content_type.clone()));
            res.insert_header((header::CONTENT_RANGE, format!("bytes {}-{}/{}", r.start, r.end, rep.len)));
            body.data(r);
            res
        }
        Decision::Partial(ranges) => {
            let mut res = HttpResponse::build(StatusCode::PARTIAL_CONTENT);
            let ct = rep.content_type.to_str().unwrap_or("application/octet-stream");
            for r in ranges {
                body.text(format!(
                    "\r\n--{}\r\nContent-Type: {ct}\r\nContent-Range: bytes {}-{}/{}\r\n\r\n",
                    ctx.boundary, r.start, r.end, rep.len
                ));
                body.data(*r);
            }
            body.text(format!("\r\n--{}--\r\n", ctx.boundary));
            let ct = HeaderValue::from_str(&format!("multipart/byteranges; boundary={}", ctx.boundary))
                .unwrap_or_else(|_| HeaderValue::from_static("multipart/byteranges"));
            res.insert_header((header::CONTENT_TYPE, ct));
            res
        }
    };
    common_headers(&mut res, rep);
    // Paced piece by piece: the download holds its agent's slot until it ends.
    let permit = ctx.permit.map(|mut p| {
        p.hold_slot();
        p
    });
    res.body(SizedStream::new(
        body.len,
        PieceStream::new(body.pieces, ctx.sent_counter, permit).with_max_piece(ctx.max_piece).on_short(ctx.on_short),
    ))
}
