"""The HTTP + Server-Sent-Events gateway: submit jobs over HTTP, watch them live.

``pgjobs gateway`` serves ``pgjobs.gateway.app.create_app`` with uvicorn. See
docs/gateway.md for the API.
"""
