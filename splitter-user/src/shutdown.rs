//! The daemon's stop signal for its background tasks: each task's loop
//! waits on [`Shutdown`] beside its own work and returns at a safe point
//! (between two checks, two samples, two walks), never in the middle of
//! one; the daemon fires the [`Trigger`] and then waits for the tasks.
use tokio::sync::watch;

/// The sending side: fired once by the daemon when it stops.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// The receiving side, cloned into every background task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new, unfired signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every task to stop.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once the signal fired (at once if it already has, or if the
    /// trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// Has the signal fired?
    pub fn fired(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_signal_once_fired() {
        let (trigger, shutdown) = channel();
        let mut a = shutdown.clone();
        let mut b = shutdown;
        assert!(!a.fired());
        let waiter = tokio::spawn(async move {
            a.wait().await;
            a.fired()
        });
        trigger.fire();
        assert!(waiter.await.unwrap());
        b.wait().await;
        assert!(b.fired());
    }

    #[tokio::test]
    async fn a_dropped_trigger_releases_the_waiters() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        shutdown.wait().await;
    }
}
