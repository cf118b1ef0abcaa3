"""Background work: workers that claim timers, inbox and outbox items from the store under leases."""
