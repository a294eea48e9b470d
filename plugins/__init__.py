"""Built-in plugins. Each is registered through the ``pallet.plugins`` entry points."""
