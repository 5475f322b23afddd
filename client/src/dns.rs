//! A DNS stub on loopback: answers the organisation's private names with 127.0.0.1 (where
//! `portcullis tcp` forwards listen) and refuses everything else: it forwards nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
use tokio::net::UdpSocket;

use crate::services::Services;

/// Serves until the task is dropped.
pub(crate) async fn serve(socket: UdpSocket, services: Arc<Services>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(answer) = answer(&buf[..n], &services) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

fn answer(query: &[u8], services: &Services) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.authoritative = true;
    resp.add_queries(query.queries.iter().cloned());
    let mut code = ResponseCode::NoError;
    for q in &query.queries {
        let name = q.name().to_ascii();
        if !services.is_private(name.trim_end_matches('.')) {
            code = ResponseCode::Refused;
            continue;
        }
        if q.query_type() == RecordType::A {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A(Ipv4Addr::LOCALHOST)),
            ));
        }
    }
    resp.metadata.response_code = code;
    resp.to_vec().ok()
}

/// Binds the stub's socket (loopback only).
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the DNS stub listens on loopback only, not {addr}"
    );
    UdpSocket::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the DNS stub on {addr}: {e}"))
}
