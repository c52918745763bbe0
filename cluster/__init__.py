"""The scaled-out topology: what `docker compose up` starts, and the same on loopback for tests."""
