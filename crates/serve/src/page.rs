//! The search page at `GET /` (plain HTML, CSS and JS in the binary, no
//! external requests), the thumbnails it shows (`GET /v1/thumbnail`, a
//! video's frame at `t`): resized on demand, kept in a bounded in-memory
//! cache, and the videos it plays (`GET /v1/video`, with byte ranges, so a
//! player can start at a segment). Both serve only files the store has
//! indexed, so they cannot read anything else on the server.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{guarded, ApiError};
use super::state::Shared;

const PAGE: &str = include_str!("page.html");

/// Sizes a thumbnail may be asked for (its longer side, in pixels).
pub const SIZES: std::ops::RangeInclusive<u32> = 16..=2048;

/// `GET /`: the search page.
pub async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

#[derive(Deserialize)]
pub struct ThumbQuery {
    path: Option<String>,
    size: Option<u32>,
    /// A video's frame at this second.
    t: Option<f64>,
}

/// `GET /v1/thumbnail?path=P&size=N`: a JPEG of the indexed image at `P`,
/// its longer side `N` pixels (256 by default), EXIF orientation applied.
pub async fn thumbnail(
    State(st): State<Shared>,
    q: Result<Query<ThumbQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "thumbnail", async move {
        let st = st2;
        let Query(q) = q.map_err(|e| ApiError::bad("query", e.body_text()))?;
        let path = given_path(q.path)?;
        let size = q.size.unwrap_or(256);
        let t = match q.t {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(ApiError::bad("t", "expected seconds, 0 or more"))
            }
            t => t,
        };
        if !SIZES.contains(&size) {
            return Err(ApiError::bad(
                "size",
                format!("expected {} to {} pixels", SIZES.start(), SIZES.end()),
            ));
        }
        let path = indexed(&st, path, "image").await?;
        let st3 = st.clone();
        let bytes = tokio::task::spawn_blocking(move || -> Result<Arc<Vec<u8>>, ApiError> {
            let file = PathBuf::from(&path);
            let mtime = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .map_err(|_| not_found("image"))?;
            st3.thumbs.get_or_make(&file, size, t, mtime)
        })
        .await
        .map_err(internal)??;
        Ok((
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "private, max-age=3600"),
            ],
            bytes.as_ref().clone(),
        )
            .into_response())
    })
    .await
}

/// The query's `path`, or a 400 naming it.
fn given_path(path: Option<String>) -> Result<String, ApiError> {
    path.filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad("path", "missing"))
}

fn internal(e: impl ToString) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// The 404 of a path the store has not indexed as `what`.
fn not_found(what: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no indexed {what} at this path"),
    );
    e.param = Some("path".into());
    e
}

/// `path` when the server's store has indexed it (a 404 naming `what`
/// otherwise, a 503 without a store): what keeps the page's endpoints from
/// reading any other file on the server.
async fn indexed(st: &Shared, path: String, what: &str) -> Result<String, ApiError> {
    let (Some(store), Some(model)) = (st.store.clone(), st.store_model) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_store",
            "this server has no store; start it with --store PATH",
        ));
    };
    let st = st.clone();
    let p = path.clone();
    let caption = tokio::task::spawn_blocking(move || {
        st.search
            .with(&store, model, |catalog, _| catalog.caption_of(&p))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    match caption {
        Some(_) => Ok(path),
        None => Err(not_found(what)),
    }
}

/// (path, size, a video frame's time in milliseconds).
#[derive(Deserialize)]
pub struct VideoQuery {
    path: Option<String>,
}

/// `GET /v1/video?path=P`: the indexed video at `P`, with byte ranges
/// (tower-http's `ServeFile`), so the page's player can seek to a segment.
pub async fn video(
    State(st): State<Shared>,
    q: Result<Query<VideoQuery>, axum::extract::rejection::QueryRejection>,
    req: axum::extract::Request,
) -> Response {
    use tower::ServiceExt;
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "video", async move {
        let Query(q) = q.map_err(|e| ApiError::bad("query", e.body_text()))?;
        let path = given_path(q.path)?;
        if !crate::index::video_segments::is_video(Path::new(&path)) {
            return Err(not_found("video"));
        }
        let path = indexed(&st2, path, "video").await?;
        let r = tower_http::services::ServeFile::new(&path)
            .oneshot(req)
            .await
            .map_err(internal)?;
        Ok(r.map(axum::body::Body::new).into_response())
    })
    .await
}

type Key = (PathBuf, u32, Option<u64>);

/// Encoded thumbnails by (path, size), each with the file's modification
/// time (a changed file is made again); the oldest go first past `budget`
/// bytes.
pub struct Thumbnails {
    inner: Mutex<Inner>,
    budget: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, (SystemTime, Arc<Vec<u8>>)>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl Default for Thumbnails {
    fn default() -> Self {
        Self::new(64 << 20)
    }
}

impl Thumbnails {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    fn get_or_make(
        &self,
        path: &Path,
        size: u32,
        t: Option<f64>,
        mtime: SystemTime,
    ) -> Result<Arc<Vec<u8>>, ApiError> {
        let key = (
            path.to_path_buf(),
            size,
            t.map(|t| (t * 1000.0).round() as u64),
        );
        if let Some(b) = self.lookup(&key, mtime) {
            return Ok(b);
        }
        let bytes = Arc::new(make(path, size, t)?);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, old)) = g.map.insert(key.clone(), (mtime, bytes.clone())) {
            g.bytes -= old.len();
            g.order.retain(|k| k != &key);
        }
        g.bytes += bytes.len();
        g.order.push_back(key);
        while g.bytes > self.budget {
            let Some(k) = g.order.pop_front() else { break };
            if let Some((_, b)) = g.map.remove(&k) {
                g.bytes -= b.len();
            }
        }
        Ok(bytes)
    }

    fn lookup(&self, key: &Key, mtime: SystemTime) -> Option<Arc<Vec<u8>>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map
            .get(key)
            .filter(|(t, _)| *t == mtime)
            .map(|(_, b)| b.clone())
    }

    /// How many thumbnails are held, and their bytes.
    pub fn held(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.map.len(), g.bytes)
    }
}

/// Decodes `path` (EXIF orientation applied; a video's frame at `t`) and
/// encodes it as a JPEG whose longer side is at most `size`.
fn make(path: &Path, size: u32, t: Option<f64>) -> Result<Vec<u8>, ApiError> {
    let img = match t {
        Some(t) => clasp_core::video::probe(path)
            .and_then(|info| clasp_core::video::frame_at(&info, t.min(info.duration)))
            .map(|f| f.image),
        None => crate::preprocess::image::load_image(path),
    };
    let img = img.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_image",
            format!("the indexed file cannot be decoded: {e}"),
        )
    })?;
    let small = image::DynamicImage::ImageRgb8(img).thumbnail(size, size);
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode_image(&small)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cached thumbnail is reused while its file is unchanged, made again
    /// when the modification time moves, and the oldest leave first once
    /// the budget is passed.
    #[test]
    fn the_cache_reuses_refreshes_and_evicts() {
        let d = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let paths: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = d.path().join(format!("{i}.png"));
                img.save(&p).unwrap();
                p
            })
            .collect();
        let t0 = SystemTime::UNIX_EPOCH;
        let one = make(&paths[0], 64, None).unwrap().len();
        let cache = Thumbnails::new(2 * one + one / 2);
        let a = cache.get_or_make(&paths[0], 64, None, t0).unwrap();
        let decoded = image::load_from_memory(&a).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 43));
        assert!(Arc::ptr_eq(
            &a,
            &cache.get_or_make(&paths[0], 64, None, t0).unwrap()
        ));
        let t1 = t0 + std::time::Duration::from_secs(1);
        assert!(!Arc::ptr_eq(
            &a,
            &cache.get_or_make(&paths[0], 64, None, t1).unwrap()
        ));
        assert_eq!(cache.held().0, 1);
        cache.get_or_make(&paths[1], 64, None, t0).unwrap();
        cache.get_or_make(&paths[2], 64, None, t0).unwrap();
        let (n, bytes) = cache.held();
        assert_eq!(n, 2, "the oldest left");
        assert!(bytes <= 2 * one + one / 2);
        assert!(cache.lookup(&(paths[0].clone(), 64, None), t1).is_none());
    }
}
