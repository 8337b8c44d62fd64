//! Answers encoded where they are built.
//!
//! A generated server encodes its answer on the network thread that sends it. For a large answer (a
//! scan of a thousand keys) that encoding, and the freeing of the message's many small allocations
//! afterwards, is most of the network stage's work: measured on a node serving 1,000-key scans, half of
//! its network threads' CPU (`perf`: prost's varint and message encoding ~25 %, `free` ~23 %). That
//! work runs in arrival order on threads every request shares, so no request priority reaches it.
//! [`Encoded`] lets a handler encode the bulk of its answer in the storage stage instead, at the
//! request's class and OS priority, and hand the network stage bytes to copy.
//!
//! The servers whose answers are [`Encoded`] are chosen in `build.rs` (`ENCODED_ANSWERS`); their
//! clients, generated separately, decode the plain message: the bytes on the wire are a valid encoding
//! of it.

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

/// A `T` of which some fields were encoded ahead of time.
///
/// Its encoding is `message`'s fields followed by the pre-encoded ones. Protobuf merges the fields of
/// concatenated encodings, so as long as the two parts set different fields (the handler's job) a
/// reader decodes exactly the message that was meant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded<T> {
    message: T,
    fields: Vec<u8>,
}

impl<T: Message + Default> Encoded<T> {
    /// `message` with nothing encoded ahead of time.
    pub fn new(message: T) -> Self {
        Encoded {
            message,
            fields: Vec::new(),
        }
    }

    /// `message` followed by `fields`, the encoding of a `T` setting none of `message`'s fields.
    pub fn with_fields(message: T, fields: Vec<u8>) -> Self {
        Encoded { message, fields }
    }

    /// The fields not encoded ahead of time, to fill in.
    pub fn message_mut(&mut self) -> &mut T {
        &mut self.message
    }

    /// The message this encodes. Only an answer with pre-encoded fields is decoded again.
    ///
    /// # Errors
    /// The pre-encoded fields are not a valid encoding of a `T`.
    pub fn into_message(self) -> Result<T, prost::DecodeError> {
        if self.fields.is_empty() {
            return Ok(self.message);
        }
        let mut message = self.message;
        message.merge(self.fields.as_slice())?;
        Ok(message)
    }
}

impl<T: Message> Message for Encoded<T> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.message.encode_raw(buf);
        buf.put_slice(&self.fields);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        self.message.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.message.encoded_len() + self.fields.len()
    }

    fn clear(&mut self) {
        self.message.clear();
        self.fields.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{KeyValue, ResponseHeader, ScanResponse};

    fn kv(key: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            ..KeyValue::default()
        }
    }

    #[test]
    fn a_reader_decodes_the_message_the_two_parts_make() {
        let header = ResponseHeader {
            revision: 9,
            ..ResponseHeader::default()
        };
        let bulk = ScanResponse {
            kvs: vec![kv("a"), kv("b")],
            more: true,
            ..ScanResponse::default()
        };
        let answer = Encoded::with_fields(
            ScanResponse {
                header: Some(header.clone()),
                ..ScanResponse::default()
            },
            bulk.encode_to_vec(),
        );
        let whole = ScanResponse {
            header: Some(header),
            ..bulk
        };
        let bytes = answer.encode_to_vec();
        assert_eq!(bytes.len(), answer.encoded_len());
        assert_eq!(bytes.len(), whole.encoded_len());
        assert_eq!(ScanResponse::decode(bytes.as_slice()).unwrap(), whole);
        assert_eq!(answer.into_message().unwrap(), whole);
    }

    #[test]
    fn without_pre_encoded_fields_it_is_the_message() {
        let m = ScanResponse {
            kvs: vec![kv("a")],
            ..ScanResponse::default()
        };
        let answer = Encoded::new(m.clone());
        assert_eq!(answer.encode_to_vec(), m.encode_to_vec());
        assert_eq!(
            Encoded::<ScanResponse>::decode(m.encode_to_vec().as_slice())
                .unwrap()
                .into_message()
                .unwrap(),
            m
        );
    }

    #[test]
    fn pre_encoded_fields_that_do_not_decode_are_an_error() {
        let answer = Encoded::with_fields(ScanResponse::default(), vec![0x12, 0x05, 0x01]);
        assert!(answer.into_message().is_err());
    }
}
