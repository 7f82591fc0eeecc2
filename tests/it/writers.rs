//! Guarantee: a batching writer never dies. A write that panics answers every request of its
//! batch with an error (the callers retry), the connection it held is not reused broken, and the
//! writer goes on with the next batch.

use crate::helpers::*;
use payment_link_worker::store::batch::{Batcher, Write};
use payment_link_worker::store::{PgConn, StoreError};

/// Echoes its requests after a round trip; panics on a batch holding 13.
struct PanicsOn13;

impl Write for PanicsOn13 {
    type Request = i64;
    type Reply = i64;
    const NAME: &'static str = "test writer";
    const MAX_BATCH: usize = 64;

    async fn write(&self, conn: &mut PgConn, requests: &[i64]) -> Result<Vec<i64>, StoreError> {
        use diesel_async::RunQueryDsl;
        diesel::sql_query("SELECT 1").execute(conn).await?;
        assert!(!requests.contains(&13), "a defect in the writer");
        Ok(requests.to_vec())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_that_panics_answers_its_batch_and_goes_on() {
    let env = TestEnv::new("http://127.0.0.1:1").await;
    let writer = Batcher::start(env.pool.clone(), PanicsOn13);
    let failed = writer.submit(13).await;
    assert!(
        matches!(&failed, Err(StoreError::Batch(message)) if message.contains("panicked")),
        "{failed:?}"
    );
    // Many callers at once after the panic: each gets its own answer.
    let answers = futures_util::future::join_all((100..150).map(|n| writer.submit(n))).await;
    for (n, answer) in (100..150).zip(answers) {
        assert_eq!(answer.ok(), Some(n));
    }
}
