"""Checkpoints: barriers, snapshots, manifests, retention and restore."""
