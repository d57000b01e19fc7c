"""`lmops k8s export`, `lmops azure export`: an endpoint as Kubernetes / Azure ML definitions (lmops/ship/)."""
