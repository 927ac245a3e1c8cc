"""The running server: app factory, lifespan, hub, bus and metrics."""
