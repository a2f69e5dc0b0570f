//! Hostile input, limits and faults, end to end (issue 3).
