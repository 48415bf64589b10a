"""maverick-serve: serve Llama 4 Maverick and Scout on a Ray Serve cluster."""

__version__ = "0.1.0"
