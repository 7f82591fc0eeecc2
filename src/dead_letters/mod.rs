//! Dead letters, from the queue to a replay: the ingester moves every dead letter into the
//! dead-letter store in PostgreSQL ([`ingest`], each as the [`row`] it makes, [`store`]), operators list, archive
//! ([`actions`]) and replay them ([`replay`], publishing through [`publish`] only to the targets
//! [`targets`] allows, recording through [`replay_rows`]), from the CLI ([`listing`] is its
//! table) or the console. A replay run is the one name for a replay, whoever starts it (the
//! console shows it as a job).

pub mod actions;
pub mod command_line;
pub mod edit;
pub mod filter;
pub mod guard;
pub mod ingest;
pub mod kind;
pub mod listing;
pub mod publish;
pub mod replay;
pub mod replay_rows;
pub mod row;
pub mod run_view;
pub mod store;
pub mod targets;
pub mod view;
pub mod working;

pub use actions::{Listed, Listing, archive, connect, list};
pub use kind::{Kind, State};
pub use publish::replay_message;
pub use replay::{ReplayError, ReplayRequest, Started, start};
pub use working::{Worked, resume, work};
