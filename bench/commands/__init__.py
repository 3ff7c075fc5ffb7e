"""One module per ``bench`` sub-command; each defines ``register(subparsers)``."""
