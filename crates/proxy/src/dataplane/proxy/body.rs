//! One body type for both directions, so nothing is boxed per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::backend::InFlight;

/// A request body on its way to a backend, or a response body on its way to the client.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body at all.
    Empty,
    /// A body held in memory: a buffered `auth` request (re-sendable) or an answer of our own.
    Full(Option<Bytes>),
    /// A body streamed through as it arrives. On a response, the guard keeps the backend's
    /// in-flight count raised until the body has been passed on (or dropped).
    Stream(Incoming, Option<InFlight>),
}

impl ProxyBody {
    /// A body of `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Stream(body, _) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(data) => data.is_none(),
            Self::Stream(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Stream(body, _) => body.size_hint(),
        }
    }
}
