"""The mqfleet collector: subscribes to the fleet and persists it."""
