//! Placeholder: the load generator and criterion benches live here (issue 4).
