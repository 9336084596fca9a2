"""Rollouts: the pure state machine and analysis, the driver that runs them, webhooks."""
