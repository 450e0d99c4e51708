"""The ppzoo conformance kit: checks every adapter, built-in or third-party, must pass."""
