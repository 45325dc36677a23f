//! The handle of a background task that pushes flag changes (PostgreSQL's listener, MySQL's
//! poller).

use tokio::task::JoinHandle;

/// Stops the task when dropped.
pub(crate) struct ListenerHandle(JoinHandle<()>);

impl ListenerHandle {
    pub(crate) fn new(task: JoinHandle<()>) -> ListenerHandle {
        ListenerHandle(task)
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}
