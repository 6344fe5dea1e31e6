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
//! The bytes are exactly what tonic sends for the generated `ServerMsg`
//! (the tests compare them).

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// gRPC's message prefix: the compression flag and the length (u32, big
/// endian).
const PREFIX: usize = 5;

/// A task's fields as a `ServerMsg` carries them, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct TaskMsg<'a> {
    pub task: &'a str,
    pub id: u64,
    pub attempt: u32,
    pub epoch: u64,
    pub retry: u32,
}

impl TaskMsg<'_> {
    /// The `ServerMsg` fields in tag order; proto3 writes no default value.
    fn fields(&self) -> [(u32, u64); 4] {
        [
            (2, self.id),
            (3, u64::from(self.attempt)),
            (4, self.epoch),
            (5, u64::from(self.retry)),
        ]
    }

    fn encoded_len(&self) -> usize {
        let text = if self.task.is_empty() {
            0
        } else {
            1 + encoded_len_varint(self.task.len() as u64) + self.task.len()
        };
        let numbers: usize = self
            .fields()
            .iter()
            .filter(|(_, value)| *value != 0)
            .map(|(_, value)| 1 + encoded_len_varint(*value))
            .sum();
        text + numbers
    }

    /// Writes the gRPC message: prefix, then the `ServerMsg`.
    fn write(&self, buf: &mut BytesMut) {
        let len = self.encoded_len();
        buf.put_u8(0);
        // A task is far below 4 GiB: the config bounds its text.
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        if !self.task.is_empty() {
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(self.task.len() as u64, buf);
            buf.put_slice(self.task.as_bytes());
        }
        for (tag, value) in self.fields() {
            if value != 0 {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(value, buf);
            }
        }
    }
}

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
/// their size) and returns each one's place in it, in order.
pub fn encode_block<'a>(msgs: &[TaskMsg<'a>]) -> Vec<Framed> {
    let size = msgs.iter().map(|m| PREFIX + m.encoded_len()).sum();
    let mut buf = BytesMut::with_capacity(size);
    let mut ends = Vec::with_capacity(msgs.len());
    for msg in msgs {
        msg.write(&mut buf);
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

    /// The run's bytes (a slice of the block: no copy).
    pub fn into_bytes(self) -> Bytes {
        self.block.slice(self.start..self.end)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::contact::ServerMsg;

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

    fn borrowed(msg: &ServerMsg) -> TaskMsg<'_> {
        TaskMsg {
            task: &msg.task,
            id: msg.id,
            attempt: msg.attempt,
            epoch: msg.epoch,
            retry: msg.retry,
        }
    }

    #[test]
    fn a_block_holds_what_tonic_would_send_for_each_message() {
        let msgs = cases();
        let borrowed: Vec<TaskMsg<'_>> = msgs.iter().map(borrowed).collect();
        let framed = encode_block(&borrowed);
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
        let borrowed: Vec<TaskMsg<'_>> = msgs.iter().map(borrowed).collect();
        let (a, b) = (encode_block(&borrowed), encode_block(&borrowed));
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
