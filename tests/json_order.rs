//! JSON read with its object members in the order they were written (serde_json's map sorts
//! them), to compare what the bus writes with MassTransit's output member by member.

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// JSON kept in the order it was written (serde_json's map sorts its keys).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// An object, its members in order.
    Object(Vec<(String, Node)>),
    /// An array.
    Array(Vec<Node>),
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// A number.
    Number,
    /// A string.
    String(String),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Bool)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_str<E>(self, text: &str) -> Result<Node, E> {
                Ok(Node::String(text.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut members = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Node>()? {
                    members.push((key, value));
                }
                Ok(Node::Object(members))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

impl Node {
    /// The members of an object, in order (panics on anything else: for tests).
    pub fn members(&self) -> &[(String, Node)] {
        match self {
            Node::Object(members) => members,
            other => panic!("not an object: {other:?}"),
        }
    }

    /// The member named `name` (panics when there is none).
    pub fn get(&self, name: &str) -> &Node {
        self.members().iter().find(|(k, _)| k == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no `{name}`"))
    }

    /// The members' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.members().iter().map(|(k, _)| k.as_str()).collect()
    }

    /// What kind of JSON value it is, its text for strings left out.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Object(_) => "object",
            Node::Array(_) => "array",
            Node::Null => "null",
            Node::Bool => "bool",
            Node::Number => "number",
            Node::String(_) => "string",
        }
    }
}
