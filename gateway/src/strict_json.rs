//! Strict JSON: objects whose member names are unique.
//!
//! In: JSON bytes from a client (an admin API body, a request body the tenant check reads).
//! Out: the value, or an error when it is malformed or any object repeats a member name.
//! serde_json keeps the last of repeated names while other parsers keep the first, so a
//! document with repeats means different things to the gateway and to an upstream: refused.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum StrictJsonError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("member {0:?} appears more than once")]
    Duplicate(String),
}

/// Parses `bytes`, refusing repeated member names at any depth.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = deserializer.deserialize_any(StrictVisitor).map_err(|e| {
        let text = e.to_string();
        match text.strip_prefix(DUPLICATE) {
            Some(name) => StrictJsonError::Duplicate(name.split(" at line").next().unwrap_or(name).to_owned()),
            None => StrictJsonError::Malformed(text),
        }
    })?;
    deserializer
        .end()
        .map_err(|e| StrictJsonError::Malformed(e.to_string()))?;
    Ok(value)
}

/// The members of a top-level object (in document order), `None` when the document is not an
/// object.
pub fn top_level_members(bytes: &[u8]) -> Result<Option<Map<String, Value>>, StrictJsonError> {
    Ok(match parse(bytes)? {
        Value::Object(map) => Some(map),
        _ => None,
    })
}

const DUPLICATE: &str = "duplicate member ";

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Seed)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(Seed)?;
            if members.contains_key(&name) {
                return Err(de::Error::custom(format!("{DUPLICATE}{name}")));
            }
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

struct Seed;

impl<'de> de::DeserializeSeed<'de> for Seed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_are_refused_at_any_depth() {
        assert!(matches!(parse(br#"{"a":1,"a":2}"#), Err(StrictJsonError::Duplicate(n)) if n == "a"));
        assert!(matches!(
            parse(br#"{"m":{"tenantId":"t1","tenantId":"t2"}}"#),
            Err(StrictJsonError::Duplicate(n)) if n == "tenantId"
        ));
        assert!(matches!(
            parse(br#"[{"x":1},{"y":1,"y":1}]"#),
            Err(StrictJsonError::Duplicate(_))
        ));
        assert_eq!(parse(br#"{"a":[1,{"b":null}],"c":"d"}"#).unwrap()["c"], "d");
        assert!(matches!(parse(b"{\"a\":1} x"), Err(StrictJsonError::Malformed(_))));
        assert!(matches!(parse(b"{"), Err(StrictJsonError::Malformed(_))));
    }
}
