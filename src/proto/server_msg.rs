//! `ServerMsg`, the task a `getTask` stream sends, written by hand instead of
//! by prost-build (`tools/protogen` maps `.ServerMsg` here with
//! `extern_path`) for one reason: fan-out. A broadcast task goes to every
//! agent with the same bytes, so the server encodes it once
//! ([`ServerMsg::pre_encoded`]) and each stream sends those shared bytes,
//! where the generated message made every stream clone the text and encode
//! it again. Its fields and wire format are the generated ones' (tag for
//! tag; the tests compare the bytes with a prost-derived twin), so clients
//! (the agent, the tests) use it as before.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError,
    encoding::{DecodeContext, WireType, skip_field, string, uint32, uint64},
};

/// A task sent to an agent (see `proto/contact.proto`).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ServerMsg {
    pub task: String,
    /// contactd: the task's id (starts at 1), to be echoed in Result.task_id.
    pub id: u64,
    /// contactd: 1 for a first delivery, higher when the task is redelivered.
    pub attempt: u32,
    /// contactd: the server run that issued the task (random per start), to
    /// be echoed in Result.epoch.
    pub epoch: u64,
    /// contactd: how many times an operator sent the task back to the queue.
    pub retry: u32,
    /// The message already encoded: when set, it is what is sent, and the
    /// fields above are not read (they are empty in the server's copy).
    /// Never set by decoding.
    pub encoded: Option<Bytes>,
}

impl ServerMsg {
    /// `msg` encoded once, as a message whose every copy sends those bytes.
    pub fn pre_encoded(msg: &ServerMsg) -> ServerMsg {
        ServerMsg {
            encoded: Some(Bytes::from(prost::Message::encode_to_vec(msg))),
            ..ServerMsg::default()
        }
    }
}

impl std::fmt::Debug for ServerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ServerMsg");
        match &self.encoded {
            Some(bytes) => d.field("encoded_len", &bytes.len()),
            None => d
                .field("task", &self.task)
                .field("id", &self.id)
                .field("attempt", &self.attempt)
                .field("epoch", &self.epoch)
                .field("retry", &self.retry),
        }
        .finish()
    }
}

impl prost::Message for ServerMsg {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(bytes) = &self.encoded {
            buf.put_slice(bytes);
            return;
        }
        // proto3: default values are not written.
        if !self.task.is_empty() {
            string::encode(1, &self.task, buf);
        }
        if self.id != 0 {
            uint64::encode(2, &self.id, buf);
        }
        if self.attempt != 0 {
            uint32::encode(3, &self.attempt, buf);
        }
        if self.epoch != 0 {
            uint64::encode(4, &self.epoch, buf);
        }
        if self.retry != 0 {
            uint32::encode(5, &self.retry, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let field = |e: DecodeError, name| {
            let mut e = e;
            e.push("ServerMsg", name);
            e
        };
        match tag {
            1 => string::merge(wire_type, &mut self.task, buf, ctx).map_err(|e| field(e, "task")),
            2 => uint64::merge(wire_type, &mut self.id, buf, ctx).map_err(|e| field(e, "id")),
            3 => uint32::merge(wire_type, &mut self.attempt, buf, ctx)
                .map_err(|e| field(e, "attempt")),
            4 => uint64::merge(wire_type, &mut self.epoch, buf, ctx).map_err(|e| field(e, "epoch")),
            5 => uint32::merge(wire_type, &mut self.retry, buf, ctx).map_err(|e| field(e, "retry")),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        if let Some(bytes) = &self.encoded {
            return bytes.len();
        }
        let mut len = 0;
        if !self.task.is_empty() {
            len += string::encoded_len(1, &self.task);
        }
        if self.id != 0 {
            len += uint64::encoded_len(2, &self.id);
        }
        if self.attempt != 0 {
            len += uint32::encoded_len(3, &self.attempt);
        }
        if self.epoch != 0 {
            len += uint64::encoded_len(4, &self.epoch);
        }
        if self.retry != 0 {
            len += uint32::encoded_len(5, &self.retry);
        }
        len
    }

    fn clear(&mut self) {
        *self = ServerMsg::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// What prost-build generates for `message ServerMsg`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(string, tag = "1")]
        task: String,
        #[prost(uint64, tag = "2")]
        id: u64,
        #[prost(uint32, tag = "3")]
        attempt: u32,
        #[prost(uint64, tag = "4")]
        epoch: u64,
        #[prost(uint32, tag = "5")]
        retry: u32,
    }

    #[test]
    fn the_bytes_are_prost_builds_and_pre_encoded_copies_send_the_same() {
        let cases = [
            ("", 0, 0, 0, 0),
            ("uptime", 1, 1, 42, 0),
            ("é\n\0", u64::MAX, u32::MAX, u64::MAX, 7),
        ];
        for (task, id, attempt, epoch, retry) in cases {
            let ours = ServerMsg {
                task: task.into(),
                id,
                attempt,
                epoch,
                retry,
                encoded: None,
            };
            let theirs = Generated {
                task: task.into(),
                id,
                attempt,
                epoch,
                retry,
            };
            let bytes = theirs.encode_to_vec();
            assert_eq!(ours.encode_to_vec(), bytes);
            assert_eq!(ours.encoded_len(), bytes.len());
            let shared = ServerMsg::pre_encoded(&ours);
            assert_eq!(shared.encode_to_vec(), bytes);
            assert_eq!(shared.encoded_len(), bytes.len());
            assert_eq!(ServerMsg::decode(&bytes[..]).unwrap(), ours);
        }
        // Unknown fields (a newer server) are skipped.
        let mut newer = Generated {
            task: "t".into(),
            id: 3,
            ..Generated::default()
        }
        .encode_to_vec();
        prost::encoding::string::encode(9, &"later".to_owned(), &mut newer);
        let decoded = ServerMsg::decode(&newer[..]).unwrap();
        assert_eq!((decoded.task.as_str(), decoded.id), ("t", 3));
    }
}
