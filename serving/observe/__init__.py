"""Watching the server: telemetry (counters, /metrics), call_log (the one line of a failed call),
hook (the dataplane's optional hook) with tracing and request_log, worker_metrics (several
workers' /metrics merged).
"""
