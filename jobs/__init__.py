"""Scheduled jobs (APScheduler 3.x) that run inside the service process."""
