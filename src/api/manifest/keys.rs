//! Where a key is in a YAML document: the document read once more as a tree of keys, each with
//! its line, to point at the keys the UploadFarm types did not take.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// One step of a key's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A key's path from the document's root: `spec.directories[1].pth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath(Vec<Step>);

impl KeyPath {
    pub fn of(path: &serde_ignored::Path<'_>) -> KeyPath {
        use serde_ignored::Path;
        let mut steps = Vec::new();
        let mut at = path;
        loop {
            at = match at {
                Path::Root => break,
                Path::Seq { parent, index } => {
                    steps.push(Step::Index(*index));
                    parent
                }
                Path::Map { parent, key } => {
                    steps.push(Step::Key(key.clone()));
                    parent
                }
                Path::Some { parent }
                | Path::NewtypeStruct { parent }
                | Path::NewtypeVariant { parent } => parent,
            };
        }
        steps.reverse();
        KeyPath(steps)
    }

    /// `apiVersion` or `kind` at the top: checked before the types read the document.
    pub fn is_type_key(&self) -> bool {
        matches!(self.0.as_slice(), [Step::Key(k)] if k == "apiVersion" || k == "kind")
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Each path as `spec.replicass at line 6` (without the line where it cannot be found).
pub fn locate_all(text: &str, paths: &[KeyPath]) -> Vec<String> {
    let tree = serde_saphyr::from_str::<Node>(text).ok();
    paths
        .iter()
        .map(|p| match tree.as_ref().and_then(|t| t.line_of(&p.0)) {
            Some(line) => format!("{p} at line {line}"),
            None => p.to_string(),
        })
        .collect()
}

/// A YAML document as keys (with where each is) and positions, values left out.
enum Node {
    Map(Vec<(Spanned<KeyText>, Node)>),
    Seq(Vec<Node>),
    Leaf,
}

impl Node {
    /// The line of the last key of `path`.
    fn line_of(&self, path: &[Step]) -> Option<u64> {
        let (first, rest) = path.split_first()?;
        let (line, child) = match (self, first) {
            (Node::Map(entries), Step::Key(k)) => {
                let (key, child) = entries.iter().find(|(key, _)| key.value.0 == *k)?;
                (key.referenced.line(), child)
            }
            (Node::Seq(items), Step::Index(i)) => (0, items.get(*i)?),
            _ => return None,
        };
        if rest.is_empty() {
            (line > 0).then_some(line)
        } else {
            child.line_of(rest)
        }
    }
}

/// A mapping key as text, whatever scalar it was written as.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
                    entries.push((key, map.next_value::<Node>()?));
                }
                Ok(Node::Map(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(steps: &[&str]) -> KeyPath {
        KeyPath(
            steps
                .iter()
                .map(|s| match s.parse() {
                    Ok(n) => Step::Index(n),
                    Err(_) => Step::Key(s.to_string()),
                })
                .collect(),
        )
    }

    #[test]
    fn keys_are_found_in_block_and_flow_style_at_any_depth() {
        let text = "a:\n  b: 1\n  list:\n    - x: 1\n    - {y: 2, z: 3}\nc: {d: [1, {e: 2}]}\n";
        let at = |steps: &[&str]| locate_all(text, &[path(steps)]).remove(0);
        assert_eq!(at(&["a", "b"]), "a.b at line 2");
        assert_eq!(at(&["a", "list", "1", "z"]), "a.list[1].z at line 5");
        assert_eq!(at(&["c", "d", "1", "e"]), "c.d[1].e at line 6");
        assert_eq!(at(&["a", "nothing"]), "a.nothing");
        assert_eq!(at(&["a", "list", "7"]), "a.list[7]");
    }
}
