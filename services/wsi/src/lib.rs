//! Whole-slide reading.
