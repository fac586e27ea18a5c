"""One plain class per role (no Ray inside); the cluster layer wraps them."""
