//! Reports over a workspace's journal and creation history: credits spent by member, model
//! or day ([`usage`]), and CSV exports ([`export`]) that stream page by page, never holding
//! more than one page in memory.

pub mod csv;
pub mod export;
pub mod usage;
