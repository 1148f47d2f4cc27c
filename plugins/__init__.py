"""deitctl's built-in plugins, registered through the ``deitctl`` entry-point group."""
