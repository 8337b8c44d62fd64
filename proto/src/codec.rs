//! The codec of Kiwi's generated gRPC servers.
//!
//! tonic's [`ProstCodec`] answers a request whose body is not a valid protobuf message with `INTERNAL`
//! ("failed to decode Protobuf message"), as gRPC's status code table suggests. Kiwi's API documents
//! `INVALID_ARGUMENT` for a malformed request, and `INTERNAL` would tell the caller the node is broken
//! when the caller is. [`ServerCodec`] is [`ProstCodec`] with only that one difference: it is what every
//! generated `*_server` module uses (see `build.rs`).
//!
//! Generated clients keep [`ProstCodec`]: a response a client cannot decode is the server's fault, not
//! an invalid argument, so it stays `INTERNAL`.
//!
//! What the codec does not see, because tonic handles it before the message reaches a decoder:
//! - a message over the service's `max_decoding_message_size`: tonic refuses it with `OUT_OF_RANGE`
//!   ("decoded message length too large: found N bytes, the limit is: M bytes");
//! - a body that ends inside a gRPC frame (the 5-byte length prefix promises more bytes than arrive):
//!   tonic answers `INTERNAL` ("Unexpected EOF decoding stream."), a transport-level framing error.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] for servers: encodes responses exactly like it, and answers a request that cannot be
/// decoded with `INVALID_ARGUMENT` (saying why) instead of `INTERNAL`.
#[derive(Debug, Clone)]
pub struct ServerCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> ServerCodec<T, U> {
    /// A codec encoding `T` (responses) and decoding `U` (requests).
    pub fn new() -> Self {
        ServerCodec {
            inner: ProstCodec::new(),
        }
    }
}

impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// [`ProstDecoder`] whose decode errors are `INVALID_ARGUMENT`: the decoder of [`ServerCodec`].
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner
            .decode(buf)
            .map_err(|status| undecodable_request::<U>(&status))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The status for a request [`ProstDecoder`] refused with `status` (whose message is prost's
/// `DecodeError`: "failed to decode Protobuf message: <field path>: <reason>").
fn undecodable_request<U>(status: &Status) -> Status {
    Status::invalid_argument(format!(
        "malformed request: could not decode the {} message: {}",
        short_type_name::<U>(),
        status.message()
    ))
}

/// `U`'s name without its module path (`kiwi_proto::v1::PutRequest` → `PutRequest`).
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{PutRequest, PutResponse};
    use prost::bytes::BufMut;
    use tonic::Code;
    use tonic::codec::{EncodeBody, EncodeBuf, Encoder, Streaming};

    /// Writes its bytes as they are: the body of a request from a client that sends whatever it likes.
    struct RawEncoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::default()
        }
    }

    /// What a server using [`ServerCodec`] decodes from a request body of one gRPC frame holding
    /// `payload`, with `limit` as the service's `max_decoding_message_size`.
    async fn decode_request(payload: Vec<u8>, limit: Option<usize>) -> Result<PutRequest, Status> {
        let body = EncodeBody::new_client(
            RawEncoder,
            tonic::codegen::tokio_stream::iter([Ok(payload)]),
            None,
            None,
        );
        let mut codec = ServerCodec::<PutResponse, PutRequest>::default();
        let mut stream = Streaming::new_request(codec.decoder(), body, None, limit);
        let message = stream.message().await?;
        Ok(message.expect("the body holds one message"))
    }

    fn put() -> PutRequest {
        PutRequest {
            key: b"some key".to_vec(),
            value: vec![7; 100],
            ..PutRequest::default()
        }
    }

    #[tokio::test]
    async fn decodes_a_valid_request() {
        let bytes = prost::Message::encode_to_vec(&put());
        assert_eq!(decode_request(bytes, None).await.unwrap(), put());
    }

    #[tokio::test]
    async fn undecodable_requests_are_invalid_argument_not_internal() {
        let valid = prost::Message::encode_to_vec(&put());
        let cases: [(&str, &[u8]); 3] = [
            ("garbage", &[0xff; 16]),
            ("truncated", &valid[..valid.len() - 10]),
            ("invalid wire type", &[0x0f, 0x01]),
        ];
        for (what, payload) in cases {
            let err = decode_request(payload.to_vec(), None).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
            assert!(
                err.message()
                    .starts_with("malformed request: could not decode the PutRequest message: "),
                "{what}: {err:?}"
            );
            assert!(
                err.message().contains("failed to decode Protobuf message"),
                "{what}: {err:?}"
            );
        }
    }

    /// tonic refuses an over-limit message before any decoder sees it; the status must still name the
    /// limit.
    #[tokio::test]
    async fn an_over_limit_request_is_refused_naming_the_limit() {
        let bytes = prost::Message::encode_to_vec(&put());
        let len = bytes.len();
        let err = decode_request(bytes, Some(64)).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("found {len} bytes, the limit is: 64 bytes")),
            "{err:?}"
        );
    }

    /// `build.rs` gives generated servers [`ServerCodec`] and leaves generated clients on tonic's
    /// [`ProstCodec`] (an undecodable response is not the caller's invalid argument).
    #[test]
    fn servers_use_server_codec_and_clients_keep_prost_codec() {
        let generated = include_str!(concat!(env!("OUT_DIR"), "/kiwi.v1.rs"));
        let mut servers = 0;
        let mut clients = 0;
        for module in generated.split("pub mod ").skip(1) {
            let name = module.split_whitespace().next().unwrap_or_default();
            if name.ends_with("_server") {
                servers += 1;
                assert!(
                    module.contains("crate::codec::ServerCodec::default()"),
                    "{name}"
                );
                assert!(!module.contains("ProstCodec"), "{name}");
            } else if name.ends_with("_client") {
                clients += 1;
                assert!(
                    module.contains("tonic_prost::ProstCodec::default()"),
                    "{name}"
                );
                assert!(!module.contains("ServerCodec"), "{name}");
            }
        }
        // KvService, RaftTransport, NodeAdmin, NodeLink, ControlService.
        assert_eq!((servers, clients), (5, 5));
    }
}
