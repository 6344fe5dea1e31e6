//! Broadcast tasks on the wire: encoded once, sent by every stream.
//!
//! In broadcast mode every agent receives the same bytes for a task. The
//! server encodes each published batch once, as gRPC messages (the 5-byte
//! prefix, then the `ServerMsg`) back to back in one block, and each task
//! keeps its place in that block ([`Framed`]). A `getTask` stream sends a
//! run of consecutive tasks of one block as one slice of it ([`Run`]): the
//! HTTP/2 DATA frame's payload is the shared block itself, with no copy and
//! no per-stream encode buffer. tonic's encoder would copy every message
//! into a buffer of each stream's own, which is what a fan-out stream's
//! memory was (BENCHMARKS.md, issue 15). Nor does a stream that is behind
//! copy several blocks into one frame: an agent that reads slowly would then
//! make the server hold up to HTTP/2's send buffer of its own per stream.
//!
//! The bytes are exactly what tonic sends for the generated `ServerMsg`:
//! the prefix, then prost's encoding.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use super::contact::ServerMsg;

/// gRPC's message prefix: the compression flag and the length (u32, big
/// endian).
const PREFIX: usize = 5;

/// One task's gRPC message, as a place in a block shared with the other
/// tasks encoded with it.
#[derive(Debug, Clone)]
pub struct Framed {
    block: Bytes,
    start: usize,
    end: usize,
}

impl Framed {
    /// The message's bytes (a slice of the block: no copy).
    pub fn bytes(&self) -> Bytes {
        self.block.slice(self.start..self.end)
    }

    /// Its length, prefix included.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Never: a message has at least its prefix.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Encodes `msgs` back to back in one block (one allocation of exactly
/// their size), each as a gRPC message (prost's bytes after the prefix),
/// and returns each one's place in it, in order.
pub fn encode_block(msgs: &[ServerMsg]) -> Vec<Framed> {
    let size = msgs.iter().map(|m| PREFIX + m.encoded_len()).sum();
    let mut buf = BytesMut::with_capacity(size);
    let mut ends = Vec::with_capacity(msgs.len());
    for msg in msgs {
        buf.put_u8(0);
        // A task is far below 4 GiB: submit bounds it by
        // server.max_message_size.
        buf.put_u32(u32::try_from(msg.encoded_len()).unwrap_or(u32::MAX));
        // Cannot fail: the buffer was sized for every message.
        let _ = msg.encode(&mut buf);
        ends.push(buf.len());
    }
    let block = buf.freeze();
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let framed = Framed {
                block: block.clone(),
                start,
                end,
            };
            start = end;
            framed
        })
        .collect()
}

/// Consecutive messages of one block, to be sent as one slice of it.
#[derive(Debug)]
pub struct Run {
    block: Bytes,
    start: usize,
    end: usize,
}

impl Run {
    /// A run of `first` alone.
    pub fn new(first: &Framed) -> Run {
        Run {
            block: first.block.clone(),
            start: first.start,
            end: first.end,
        }
    }

    /// Takes `next` in if it follows the run in the same block; false
    /// (nothing changed) otherwise.
    pub fn extend(&mut self, next: &Framed) -> bool {
        // Blocks are told apart by their allocation: every `Framed` of a
        // block holds the whole block, so equal pointers are one block
        // (each is alive here, so no other allocation has its address).
        let joins = next.block.as_ptr() == self.block.as_ptr() && next.start == self.end;
        if joins {
            self.end = next.end;
        }
        joins
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Never: a run has at least one message.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The run's bytes (a slice of the block: no copy).
    pub fn into_bytes(self) -> Bytes {
        self.block.slice(self.start..self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What tonic sends for `msg`: its prefix, then prost's bytes.
    fn tonic_frame(msg: &ServerMsg) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    fn cases() -> Vec<ServerMsg> {
        vec![
            ServerMsg::default(),
            ServerMsg {
                task: "uptime".into(),
                id: 1,
                attempt: 1,
                epoch: 42,
                retry: 0,
            },
            ServerMsg {
                task: "é\n\0".repeat(100),
                id: u64::MAX,
                attempt: u32::MAX,
                epoch: u64::MAX,
                retry: 7,
            },
        ]
    }

    #[test]
    fn a_block_holds_what_tonic_would_send_for_each_message() {
        let msgs = cases();
        let framed = encode_block(&msgs);
        assert_eq!(framed.len(), msgs.len());
        let mut all = Vec::new();
        for (msg, framed) in msgs.iter().zip(&framed) {
            assert_eq!(framed.bytes(), tonic_frame(msg));
            assert_eq!(framed.len(), tonic_frame(msg).len());
            assert!(!framed.is_empty());
            all.extend(tonic_frame(msg));
        }
        // The whole block is the messages back to back, as one run.
        let mut run = Run::new(&framed[0]);
        for next in &framed[1..] {
            assert!(run.extend(next));
        }
        assert_eq!(run.into_bytes(), all);
        // And the client decodes each as the message it was.
        let decoded = ServerMsg::decode(&framed[2].bytes()[PREFIX..]).unwrap();
        assert_eq!(decoded, msgs[2]);
    }

    #[test]
    fn a_run_takes_only_the_next_message_of_its_block_and_shares_its_bytes() {
        let msgs = cases();
        let (a, b) = (encode_block(&msgs), encode_block(&msgs));
        // Not the one after next, nor the same message again.
        let mut run = Run::new(&a[0]);
        assert!(!run.extend(&a[2]));
        assert!(!run.extend(&a[0]));
        // Not the next message's twin in another block.
        assert!(!run.extend(&b[1]));
        assert!(run.extend(&a[1]));
        let first_two = [a[0].bytes(), a[1].bytes()].concat();
        // Its bytes are the block's, not a copy.
        let bytes = run.into_bytes();
        assert_eq!(bytes, first_two);
        assert_eq!(bytes.as_ptr(), a[0].bytes().as_ptr());
    }
}
