//! The codec of the generated services: prost's, with buffers the server
//! can make smaller.
//!
//! tonic's defaults give every stream an 8 KiB encode buffer at its start
//! and let a busy one grow to its 32 KiB yield threshold, then keep that
//! capacity for the stream's life. A stream that is ready whenever tasks
//! wait (a queue-mode getTask, a busy sendStatus) fills it: when broadcast
//! streams still went through here, 1,000 fan-out agents held about 55 KiB
//! each, against half a KiB for a bare tonic server. Contact's messages are
//! small (a task, a status, an ack), so the server's streams start at 1 KiB
//! and yield at 8 KiB, which still carries hundreds of tasks per frame
//! ([`use_small_buffers`]). Broadcast getTask streams no longer encode at
//! all: they send shared bytes ([`super::wire`]).
//!
//! A process-wide setting, not a per-service one, because the generated
//! code makes its codec with `Default`. Whoever does not ask (the agent,
//! the benchmark's bare baseline server) keeps tonic's defaults.

use std::{marker::PhantomData, sync::OnceLock};

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The first capacity of a stream's buffers, with small buffers.
const BUFFER: usize = 1024;
/// A stream hands what it encoded to HTTP/2 once it holds this much.
const YIELD_THRESHOLD: usize = 8 * 1024;

static SETTINGS: OnceLock<BufferSettings> = OnceLock::new();

/// Makes every stream of this process start at [`BUFFER`] and yield at
/// [`YIELD_THRESHOLD`] (the server calls it as it starts; once is enough).
pub fn use_small_buffers() {
    let _ = SETTINGS.set(BufferSettings::new(BUFFER, YIELD_THRESHOLD));
}

fn settings() -> BufferSettings {
    SETTINGS.get().copied().unwrap_or_default()
}

/// [`tonic_prost::ProstCodec`] with this process' buffer settings (named by
/// `tools/protogen` as the generated code's codec).
#[derive(Debug, Clone, Copy)]
pub struct ContactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ContactCodec<T, U> {
    fn default() -> Self {
        ContactCodec(PhantomData)
    }
}

impl<T, U> Codec for ContactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
