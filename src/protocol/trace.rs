//! Allocation traces (the format of assets/traces/README.md): one JSON operation a line, read
//! into [`TraceOp`]s for [`crate::managers::replay`]. Parsing takes any `BufRead`; the caller
//! opens the file.

use crate::domain::TraceOp;
use serde::Deserialize;
use std::io::BufRead;

/// One line of a trace, as written.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum TraceLine {
    Alloc { id: u64, size: u64 },
    Free { id: u64 },
}

impl From<TraceLine> for TraceOp {
    fn from(line: TraceLine) -> Self {
        match line {
            TraceLine::Alloc { id, size } => TraceOp::Alloc { id, size },
            TraceLine::Free { id } => TraceOp::Free { id },
        }
    }
}

/// Reads a trace: one JSON op a line (blank lines ignored).
pub fn parse_trace(reader: impl BufRead) -> Result<Vec<TraceOp>, String> {
    let mut ops = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let op: TraceLine =
            serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?;
        ops.push(op.into());
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_trace_format() {
        let text = "{\"op\": \"alloc\", \"id\": 17, \"size\": 1248512}\n\n{\"op\": \"free\", \"id\": 17}\n";
        let ops = parse_trace(text.as_bytes()).unwrap();
        assert_eq!(
            ops,
            vec![
                TraceOp::Alloc {
                    id: 17,
                    size: 1248512
                },
                TraceOp::Free { id: 17 }
            ]
        );
        assert!(parse_trace("{\"op\": \"grow\"}\n".as_bytes()).is_err());
    }
}
