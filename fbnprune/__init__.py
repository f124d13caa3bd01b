"""fbnprune: keep the functional networks of MLP neurons a task needs, slice the rest away."""

__version__ = "0.1.0"
