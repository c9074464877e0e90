"""jaxforget."""
