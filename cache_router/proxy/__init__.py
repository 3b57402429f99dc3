"""The HTTP side: the middleware, the relay, upstream clients, outbound checks."""
