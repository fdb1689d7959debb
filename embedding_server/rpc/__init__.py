"""Serving the store: the gRPC service, in-process and remote clients, the wire format, the
local socket, replica sets, security, Prometheus metrics and the local server launcher."""
