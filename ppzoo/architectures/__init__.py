"""Built-in adapters, one module per architecture family; each module is a ppzoo plugin."""
