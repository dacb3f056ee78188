//! Record framing in the spool: one usage event as `key len (u16 LE) | key | Avro
//! single-object event`, so the shipper produces the tenant key and body without decoding.
//!
//! In: a [`UsageEvent`] (writer side) or a spooled record (shipper side). Out: the framed
//! bytes, or the key and body of a record.

use tollgate_schemas::{encode_usage_event, UsageEvent};

/// Key and body of one spooled record: `key len (u16 LE) | key | Avro single-object event`,
/// written into `record` (cleared first), which the writer reuses from event to event.
pub(crate) fn spool_record(event: &UsageEvent, record: &mut Vec<u8>) {
    let key = event.tenant_id.as_deref().unwrap_or("-").as_bytes();
    let key = &key[..key.len().min(u16::MAX as usize)];
    record.clear();
    record.extend_from_slice(&(key.len() as u16).to_le_bytes());
    record.extend_from_slice(key);
    encode_usage_event(event, record);
}

pub(crate) fn split_record(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_le_bytes(record.get(..2)?.try_into().ok()?) as usize;
    let key = record.get(2..2 + len)?;
    Some((key, &record[2 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_record_round_trips_key_and_body() {
        let event = UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: 1,
            tenant_id: Some("tenant_1".into()),
            consumer: None,
            key_id: None,
            plan: None,
            route: "v1".into(),
            method: "GET".into(),
            status: 200,
            outcome: tollgate_schemas::Outcome::Allowed,
            billable: true,
            units: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: None,
            gateway_id: "g".into(),
            request_id: None,
        };
        let mut record = vec![1, 2, 3];
        spool_record(&event, &mut record);
        let (key, body) = split_record(&record).unwrap();
        assert_eq!(key, b"tenant_1");
        assert_eq!(tollgate_schemas::decode::<UsageEvent>(body).unwrap(), event);
        assert!(split_record(&[5, 0, b'a']).is_none());
    }
}
