# The conformance kit's pytest plugin is opt-in; enabling it here (not in a test module) registers
# its marker before any test module uses it.
pytest_plugins = ["ppzoo.testing.pytest_plugin"]
