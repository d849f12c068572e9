//! Component versions: validated strings with dotted-numeric order.
//!
//! Vendors name pattern releases `171`, `17.10`, `2024.11.3`. The contract orders
//! them part by part, numerically where both parts are digits (`17.9` < `17.10`),
//! so a lexical sort would pick the wrong `latest`. The order below is total and
//! agrees with string equality (two versions compare equal only when they are the
//! same string), which sorting and the chain planner rely on.

use std::cmp::Ordering;
use std::fmt;

/// A version string that is safe to put in a URL path segment and a file name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

/// Why a string is not a version.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version {0:?}: use 1 to 64 characters from [0-9A-Za-z._+-], starting with a letter or digit")]
pub struct BadVersion(pub String);

impl Version {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, BadVersion> {
        let valid = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if valid { Ok(Version(s.to_string())) } else { Err(BadVersion(s.chars().take(80).collect())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Compare two all-digit strings as numbers of any length.
fn cmp_numeric(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn is_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let mut a = self.0.split('.');
        let mut b = other.0.split('.');
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                // A prefix sorts first: 17 < 17.1.
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(x), Some(y)) => {
                    let ord = match (is_numeric(x), is_numeric(y)) {
                        (true, true) => cmp_numeric(x, y),
                        // A numeric part is older than a named one (17.9 < 17.rc1):
                        // arbitrary, but total and stable.
                        (true, false) => Ordering::Less,
                        (false, true) => Ordering::Greater,
                        (false, false) => x.cmp(y),
                    };
                    if ord != Ordering::Equal {
                        return ord;
                    }
                }
            }
        }
        // Equal part by part (e.g. `017` and `17`): fall back to the bytes so that
        // only identical strings compare equal.
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Version::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn dotted_numeric_order() {
        assert!(v("171") < v("173"));
        assert!(v("99") < v("100"));
        assert!(v("17.9") < v("17.10"));
        assert!(v("17") < v("17.0"));
        assert!(v("2024.11.3") < v("2025.1"));
        assert!(v("1.9") < v("1.rc1"));
        assert!(v("017") != v("17"));
        assert_eq!(v("17").cmp(&v("17")), Ordering::Equal);
        let big = "1".repeat(60);
        assert!(v("9") < v(&big));
    }

    #[test]
    fn rejects_unsafe_strings() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "-1", "a b", "é", &"1".repeat(65)] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn version_strategy() -> impl Strategy<Value = Version> {
        "[0-9a-c][0-9a-c._+-]{0,12}".prop_map(|s| Version::parse(&s).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn order_is_total_and_consistent(a in version_strategy(), b in version_strategy(), c in version_strategy()) {
            // Antisymmetric and consistent with equality.
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
            prop_assert_eq!(a.cmp(&b) == Ordering::Equal, a == b);
            // Transitive.
            if a <= b && b <= c {
                prop_assert!(a <= c);
            }
        }

        #[test]
        fn numeric_parts_compare_as_numbers(x in 0u64..1_000_000, y in 0u64..1_000_000, p in 0u32..50) {
            let a = v(&format!("{p}.{x}"));
            let b = v(&format!("{p}.{y}"));
            prop_assert_eq!(a.cmp(&b), x.cmp(&y));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Version::parse(&s);
        }
    }
}
