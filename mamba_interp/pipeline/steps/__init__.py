"""Pipeline steps: one module per step (``sNN_<name>.py``), each registering its function with
``@register_step``. Every module in this package is imported by ``registry.discover_steps()``, so adding a step
is adding a file here (a module elsewhere may register too, if it is imported before the run)."""
