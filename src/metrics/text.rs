//! The Prometheus text exposition format (0.0.4), written by hand.
//!
//! Rules:
//! - Every family has `# HELP` and `# TYPE` under its full name: a counter's name ends in
//!   `_total` in both, as Prometheus's own client libraries write them.
//! - Label values are escaped (`\\`, `\"`, `\n`); names are this program's constants.
//! - Integers print as integers, other values with Rust's shortest round-trip form, never in
//!   exponent notation; the top bucket is `+Inf`.
//!
//! Why not OpenMetrics (`prometheus-client`): it writes a counter's `# TYPE` under the name
//! without `_total`, which the parser of Debian 12's `promtool` (2.42) and node_exporter's
//! textfile collector read as an untyped metric without help (`promtool check metrics` fails).
//! Prometheus scrapes this format as it is.

use std::fmt::Write;

/// An exposition being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

/// A sample's value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(u64),
    Signed(i64),
    Float(f64),
}

impl Text {
    /// Starts a family: help text and type (`counter`, `gauge`, `histogram`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the family last started (its name with a suffix, for histograms).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = match value {
            Value::Int(n) => writeln!(self.out, " {n}"),
            Value::Signed(n) => writeln!(self.out, " {n}"),
            Value::Float(f) if f.is_infinite() => writeln!(self.out, " {}Inf", if f > 0.0 { "+" } else { "-" }),
            Value::Float(f) => writeln!(self.out, " {f}"),
        };
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: Value) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_value_cannot_break_out_of_its_quotes_or_its_line() {
        let mut t = Text::default();
        t.family("x_total", "counter", "A help\nwith a line");
        t.sample("x_total", &[("why", "a \"b\"\\\nc")], Value::Int(3));
        assert_eq!(
            t.finish(),
            "# HELP x_total A help\\nwith a line\n# TYPE x_total counter\nx_total{why=\"a \\\"b\\\"\\\\\\nc\"} 3\n"
        );
    }

    #[test]
    fn values_print_without_exponents_and_the_top_bucket_as_plus_inf() {
        let mut t = Text::default();
        t.sample("a", &[("le", "0.0001")], Value::Float(0.0001));
        t.sample("b", &[], Value::Float(f64::INFINITY));
        t.sample("c", &[], Value::Signed(-3600));
        assert_eq!(t.finish(), "a{le=\"0.0001\"} 0.0001\nb +Inf\nc -3600\n");
    }
}
