"""
The HTTP sink: entropy API, health checks, status and Prometheus metrics.
"""
