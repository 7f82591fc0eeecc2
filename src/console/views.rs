//! What the console shows, typed once: the API serializes these views and the pages render the
//! same ones, so a field added here reaches both (and the OpenAPI document says its name).

use super::Console;
pub use crate::dead_letters::run_view::ReplayRunView;
pub use crate::dead_letters::view::DeadLetterView;
use crate::store::StoreError;

/// The view of dead letter `id` from the console's pool.
pub async fn dead_letter(console: &Console, id: i64) -> Result<Option<DeadLetterView>, StoreError> {
    let mut conn = console.pool.get().await?;
    DeadLetterView::load(&console.settings, &mut conn, id).await
}

/// The view of replay run `id` with its outcomes, if there is one.
pub async fn replay_run(console: &Console, id: i64) -> Result<Option<ReplayRunView>, StoreError> {
    let mut conn = console.pool.get().await?;
    ReplayRunView::load(&mut conn, id).await
}
