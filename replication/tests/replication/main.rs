//! Tests of the replicated log: one test binary (faster to link) with a toy state machine.

mod bench;
mod cluster;
mod single;
mod storage;
mod toy;
