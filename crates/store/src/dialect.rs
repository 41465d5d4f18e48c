//! The one difference of SQL text between the store's two databases that is
//! rewritten rather than written twice: parameters. Statements are written
//! with SQLite's `?` (anonymous, numbered in order) or `?N`; PostgreSQL
//! wants `$N`. Everything else the store sends is in the subset both
//! accept, or chosen per database where it cannot be (marked `SQLite only`).

/// `sql` with its parameters numbered for PostgreSQL. `?` inside string
/// literals and quoted names is left alone; a statement mixes no anonymous
/// and numbered parameters (SQLite would number them differently).
pub(crate) fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 0usize;
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                if digits.is_empty() {
                    next += 1;
                    out.push_str(&format!("${next}"));
                } else {
                    out.push('$');
                    out.push_str(&digits);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::to_postgres;

    #[test]
    fn anonymous_parameters_are_numbered_in_order() {
        assert_eq!(
            to_postgres("INSERT INTO t (a, b) VALUES (?,?),(?,?)"),
            "INSERT INTO t (a, b) VALUES ($1,$2),($3,$4)"
        );
    }

    #[test]
    fn numbered_parameters_keep_their_numbers() {
        assert_eq!(
            to_postgres("SELECT 1 WHERE (?1 IS NULL OR org_id = ?1) AND id > ?12"),
            "SELECT 1 WHERE ($1 IS NULL OR org_id = $1) AND id > $12"
        );
    }

    #[test]
    fn question_marks_in_strings_and_names_are_not_parameters() {
        assert_eq!(
            to_postgres("SELECT 'why?', \"odd?name\" FROM t WHERE a = ? AND b = 'it''s ?'"),
            "SELECT 'why?', \"odd?name\" FROM t WHERE a = $1 AND b = 'it''s ?'"
        );
    }
}
