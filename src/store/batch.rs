//! One batching writer behind the claim writer, the outcome writer and the sent marker: every
//! request that arrives while the previous statement runs is written by the next one, so one
//! round trip and one commit serve many commands. Callers wait for their own answer; a
//! statement that fails because of one request's data is tried again row by row, so one bad
//! row never sinks the others in its batch, and the row the database refuses (while it answers
//! otherwise) is answered [`StoreError::Refused`]: a retry loop is for the database being away,
//! not for data it refuses.

use super::{PgConn, PgPool, StoreError, bounded};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, oneshot};

/// What a batching writer writes: a batch of requests in, one reply per request out (same order).
pub trait Write: Send + Sync + 'static {
    /// One caller's request.
    type Request: Send + Sync + 'static;
    /// One caller's answer.
    type Reply: Send + 'static;
    /// The writer's name in errors and logs.
    const NAME: &'static str;
    /// Most requests in one statement.
    const MAX_BATCH: usize;
    /// Writes the batch; the replies line up with `requests`.
    fn write(
        &self,
        conn: &mut PgConn,
        requests: &[Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Reply>, StoreError>> + Send;
}

type Reply<W> = oneshot::Sender<Result<<W as Write>::Reply, StoreError>>;

/// A handle on a running batching writer; cheap to clone.
pub struct Batcher<W: Write> {
    tx: mpsc::UnboundedSender<(W::Request, Reply<W>)>,
}

impl<W: Write> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<W: Write> Batcher<W> {
    /// Starts the writer task; it stops when the last handle is dropped.
    pub fn start(pool: PgPool, writer: W) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(W::Request, Reply<W>)>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(W::MAX_BATCH);
            while rx.recv_many(&mut batch, W::MAX_BATCH).await > 0 {
                let (requests, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
                // Supervised in place: a panic in one write answers that batch with an error,
                // and the writer goes on with the next (it never dies while it has callers).
                let answers = AssertUnwindSafe(write_or_split(&pool, &writer, &requests))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(
                            writer = W::NAME,
                            rows = requests.len(),
                            "the writer panicked on a batch; it goes on with the next"
                        );
                        let error = StoreError::Batch(format!("the {} panicked", W::NAME));
                        fail_all(requests.len(), &error)
                    });
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
        });
        Self { tx }
    }

    /// Hands one request to the writer and waits until it has been written.
    pub async fn submit(&self, request: W::Request) -> Result<W::Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Batch(format!("the {} has stopped", W::NAME));
        self.tx.send((request, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Hands one request to the writer without waiting for it.
    pub fn submit_and_forget(&self, request: W::Request) {
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send((request, reply));
    }
}

/// Writes the batch; if a statement failed on what PostgreSQL answered (not the connection),
/// writes each request alone, so only the request whose data the database refused fails.
async fn write_or_split<W: Write>(
    pool: &PgPool,
    writer: &W,
    requests: &[W::Request],
) -> Vec<Result<W::Reply, StoreError>> {
    let mut conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => return fail_all(requests.len(), &StoreError::from(error)),
    };
    match bounded(pool, writer.write(&mut conn, requests)).await {
        Ok(replies) => replies.into_iter().map(Ok).collect(),
        Err(error) if error.is_refusal() || error.may_be_the_data() => {
            if requests.len() == 1 {
                return vec![confirm_refusal(pool, &mut conn, writer, requests, error).await];
            }
            tracing::warn!(%error, rows = requests.len(), writer = W::NAME,
                "batched write failed; writing its rows one by one");
            let mut answers = Vec::with_capacity(requests.len());
            for one in requests.chunks(1) {
                let answer = match bounded(pool, writer.write(&mut conn, one)).await {
                    Ok(reply) => single(reply),
                    Err(error) => confirm_refusal(pool, &mut conn, writer, one, error).await,
                };
                if let Err(StoreError::TimedOut(limit)) = &answer {
                    // The connection may be stuck mid-statement: it is not given back.
                    let error = StoreError::TimedOut(*limit);
                    let _ = deadpool::managed::Object::take(conn);
                    answers.extend(fail_all(requests.len() - answers.len(), &error));
                    return answers;
                }
                answers.push(answer);
            }
            answers
        }
        Err(error) => {
            if matches!(error, StoreError::TimedOut(_)) {
                // The connection may be stuck mid-statement: it is not given back.
                let _ = deadpool::managed::Object::take(conn);
            }
            fail_all(requests.len(), &error)
        }
    }
}

fn single<R>(mut replies: Vec<R>) -> Result<R, StoreError> {
    replies
        .pop()
        .ok_or_else(|| StoreError::Batch("the writer gave no reply".into()))
}

/// One request's write failed with `error`: a constraint violation is a refusal; another error
/// PostgreSQL answered is one if the database still answers and the same write fails again.
async fn confirm_refusal<W: Write>(
    pool: &PgPool,
    conn: &mut PgConn,
    writer: &W,
    one: &[W::Request],
    error: StoreError,
) -> Result<W::Reply, StoreError> {
    if error.is_refusal() {
        return Err(StoreError::Refused(error.to_string()));
    }
    if !error.may_be_the_data() || !answers(pool, conn).await {
        return Err(error);
    }
    match bounded(pool, writer.write(conn, one)).await {
        Ok(reply) => single(reply),
        Err(again) if again.is_refusal() || again.may_be_the_data() => {
            tracing::warn!(error = %again, writer = W::NAME, "the database refuses this request's data");
            Err(StoreError::Refused(again.to_string()))
        }
        Err(again) => Err(again),
    }
}

/// Whether the database answers a trivial statement on this connection.
async fn answers(pool: &PgPool, conn: &mut PgConn) -> bool {
    use diesel_async::RunQueryDsl;
    let check = async { Ok(diesel::sql_query("SELECT 1").execute(conn).await?) };
    bounded(pool, check).await.is_ok()
}

/// The batch's error for each of its `n` requests; a read-only host stays typed as such, so each
/// request's caller sees the demotion as the writer did.
fn fail_all<T>(n: usize, error: &StoreError) -> Vec<Result<T, StoreError>> {
    let read_only = error.is_read_only();
    let error = error.to_string();
    let each = || {
        use diesel::result::{DatabaseErrorKind, Error};
        if read_only {
            let kind = DatabaseErrorKind::ReadOnlyTransaction;
            StoreError::Query(Error::DatabaseError(kind, Box::new(error.clone())))
        } else {
            StoreError::Batch(error.clone())
        }
    };
    (0..n).map(|_| Err(each())).collect()
}
