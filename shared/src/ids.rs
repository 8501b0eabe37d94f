//! Validated identifiers. Anything that reaches SQL or a message attribute went through one of
//! these, so its length and alphabet are known.

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("must not be empty")]
    Empty,
    /// The identifier is longer than allowed.
    #[error("must be at most {max} characters")]
    TooLong {
        /// The maximum length in characters.
        max: usize,
    },
    /// The identifier holds a character outside its alphabet.
    #[error("may only contain {allowed}")]
    BadCharacter {
        /// A description of the allowed alphabet.
        allowed: &'static str,
    },
}

fn check(
    value: &str,
    max: usize,
    allowed: &'static str,
    ok: fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if value.chars().count() > max {
        return Err(IdError::TooLong { max });
    }
    if !value.chars().all(ok) {
        return Err(IdError::BadCharacter { allowed });
    }
    Ok(())
}

const SLUG: &str = "ASCII letters, digits, '-', '_' and '.'";

fn slug_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a slug: 1 to `max` ASCII letters, digits, `-`, `_` and `.` (what [`slug_id!`] types
/// accept).
pub fn check_slug(value: &str, max: usize) -> Result<(), IdError> {
    check(value, max, SLUG, slug_char)
}

/// Declares an identifier type that accepts only slugs of at most `$max` characters (see
/// [`check_slug`]): `pg_outbox::slug_id!(/** An order. */ OrderId, 64);`
#[macro_export]
macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps the identifier.
            pub fn parse(value: &str) -> Result<Self, $crate::ids::IdError> {
                $crate::ids::check_slug(value, Self::MAX_LEN)?;
                Ok(Self(value.to_owned()))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_id!(
    /// The tenant a request acts for. Comes only from the verified JWT claims, never from the
    /// request body or headers.
    TenantId,
    64
);

/// A client-chosen idempotency key (the `Idempotency-Key` header): printable ASCII, no spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Longest accepted key, in characters.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps the key.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        check(
            value,
            Self::MAX_LEN,
            "printable ASCII without spaces",
            |c| c.is_ascii_graphic(),
        )?;
        Ok(Self(value.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_slugs() {
        assert_eq!(
            TenantId::parse("acme_01H-x.9").unwrap().as_str(),
            "acme_01H-x.9"
        );
        assert!(TenantId::parse(&"t".repeat(64)).is_ok());
    }

    #[test]
    fn refuses_empty_long_and_hostile_values() {
        assert_eq!(TenantId::parse(""), Err(IdError::Empty));
        assert_eq!(
            TenantId::parse(&"t".repeat(65)),
            Err(IdError::TooLong { max: 64 })
        );
        for bad in [
            "a b",
            "x'; DROP TABLE tenants;--",
            "a/b",
            "é",
            "a\u{0}b",
            "a%20b",
            "💳",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(IdempotencyKey::parse("key with space").is_err());
        assert!(IdempotencyKey::parse("r-1:ok/ß").is_err());
        assert!(IdempotencyKey::parse("r-1:ok/x").is_ok());
    }
}
