"""Worker side: signal handlers, group commit, BatchTask, the relay/reconciler bootstep."""
